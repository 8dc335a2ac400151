# Build/test entry points; every target does its own set-up on a fresh Debian machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp
PYTEST_ARGS ?=
# CI runs as root; elsewhere apt-get needs sudo.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv system test demo bench clean distclean

venv: $(STAMP)

# The stamp makes a second `make venv` instant; it is redone when the pins or pyproject change.
$(STAMP): requirements.lock pyproject.toml
	[ -x $(VPY) ] || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip
	$(VPY) -m pip install -r requirements.lock
	$(VPY) -m pip install --no-deps -e .
	touch $@

# Slurm and munge daemons for the test cluster fixture; apt only runs when they are missing.
# /usr/sbin is added because non-root PATHs often lack it.
system:
	@if PATH="$$PATH:/usr/sbin" command -v slurmctld >/dev/null \
	    && PATH="$$PATH:/usr/sbin" command -v slurmd >/dev/null \
	    && PATH="$$PATH:/usr/sbin" command -v munged >/dev/null; then \
	  echo "system: slurm and munge already installed"; \
	else \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y slurm-wlm munge; \
	fi

# pytest exits non-zero (5) when nothing is collected, so an empty run fails here too.
test: venv system
	$(VPY) -m pytest -q $(PYTEST_ARGS)

demo: venv
	bash launch/demo.sh

BENCHES := $(wildcard bench/*.py)
bench: venv
	@[ -n "$(BENCHES)" ] || echo "bench: no bench/*.py scripts yet"
	@set -e; for f in $(BENCHES); do echo ">>> $$f"; $(VPY) $$f; done

clean:
	rm -rf demo-out build .pytest_cache .services *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
