"""A build killed with kill -9 at any point and rerun ends with exactly the shards of a clean build."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from shardtools import CLI, REPO, make_patient_tree, run_cli, shard_hashes

ARGS = ["--patient-regex", r"^(P\d+)/", "--max-side", "48", "--shard-size", "24KB", "--workers", "2", "--quiet"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume-src")
    make_patient_tree(root, patients=160, images_of=lambda p: 1 + p % 3, size=(320, 240))
    return root


@pytest.fixture(scope="module")
def clean(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "out"
    run_cli("build", source, out, *ARGS)
    return shard_hashes(out)


def _start(source, out) -> subprocess.Popen:
    # A new session so that kill -9 takes the whole process group, as a node failure would.
    return subprocess.Popen([*CLI, "build", source, out, *ARGS], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _kill_when(proc, condition, timeout=120) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if condition():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.01)
    return False


def _done_shards(out):
    return len(list((out / "_build" / "stats").glob("*/*.json"))) if (out / "_build" / "stats").exists() else 0


@pytest.mark.parametrize("when", ["planning", "first-shards", "most-shards"])
def test_kill9_then_rerun_matches_clean_build(source, clean, tmp_path, when):
    out = tmp_path / "out"
    total = len([p for p, _ in clean if p.endswith(".tar")])
    assert total >= 8
    conditions = {
        "planning": lambda: (out / "_build").exists(),
        "first-shards": lambda: _done_shards(out) >= 1,
        "most-shards": lambda: _done_shards(out) >= total * 2 // 3,
    }
    proc = _start(source, out)
    killed = _kill_when(proc, conditions[when])
    assert killed, "the build finished before it could be killed; make the fixture bigger"
    assert not (out / "manifest.json").exists()
    run_cli("build", source, out, *ARGS)
    assert shard_hashes(out) == clean
    assert not list(out.glob("*/.*tmp-*")), "temporary files left behind"
    run_cli("verify", out)
