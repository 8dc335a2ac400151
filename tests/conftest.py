"""Shared pytest configuration: loads the real-service fixtures from tests/services.py."""
import sys
from pathlib import Path

# tests/ has no __init__.py; put it on sys.path ourselves so `services` imports under any
# --import-mode (prepend mode would do it, importlib mode would not).
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

pytest_plugins = ["services"]


import pytest  # noqa: E402


@pytest.fixture
def one_thread():
    """One intra-op thread for tests on tiny matrices (threads only add wake-up latency there: 15x slower
    on a shared 2-core machine), restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- pretraining runs
# Each real launcher run costs tens of seconds of start-up on a 2-core machine, so runs with the same
# configuration are made once per session and shared by every test file that needs them (read only: a
# test that changes a run's folder works on a copy).

@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory):
    """Shards of the shipped sample (data/sample_cxr), built once per session; tests only read them."""
    from trainrun import build_sample_shards

    return build_sample_shards(tmp_path_factory.mktemp("sample-shards") / "shards")


@pytest.fixture(scope="session")
def monitor_shards(tmp_path_factory):
    """A labelled build of the sample (view, 70/30 patient split) for the kNN monitor; read only."""
    from trainrun import build_monitor_shards

    return build_monitor_shards(tmp_path_factory.mktemp("monitor-shards") / "shards")


@pytest.fixture(scope="session")
def pretrain_run(sample_shards, tmp_path_factory):
    """pretrain_run(launcher, *overrides) -> the run_dir of a finished run on `sample_shards` (trainrun.run
    with these arguments, exit status 0), made on first request and reused by every later one."""
    from trainrun import run

    done = {}

    def get(launcher: str, *overrides: str):
        key = (launcher, *overrides)
        if key not in done:
            run_dir = tmp_path_factory.mktemp(f"{launcher}-run") / "run"
            done[key] = run_dir, run(launcher, run_dir, sample_shards, *overrides)
        run_dir, proc = done[key]
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return run_dir

    return get


@pytest.fixture(scope="session")
def reference(pretrain_run):
    """The uninterrupted LARS run (ZeRO 0, warmup then cosine) through the deepspeed launcher that the
    resume, signal, torchrun, export and plain-LARS tests compare with (trainrun.REFERENCE)."""
    from trainrun import REFERENCE

    return pretrain_run("deepspeed", *REFERENCE)
