"""launch/finetune.py on bad input: exit status 2 and one `finetune: error: ` line naming what to fix, before
any model work (no config.yaml, model.pt or feature cache written).

Every case runs in process through the script's main(argv) (an interpreter start with torch costs ~5 s on a
shared machine); a few of them also run as `python launch/finetune.py` subprocesses.

The shards are generated (40 patients, 32x32 JPEGs, a 3-class column `dx`); every run uses small settings
(ResNet-18, 32 px, no loader workers, 50 resamples) so a missing check would still finish quickly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shardtools import read_manifest, run_cli, write_csv, write_image

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ("akiec", "bcc", "nv")
SMALL = ["model.depth=18", "preprocess.size=32", "data.workers=0", "report.n_resamples=50"]


def _finetune(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(ROOT / "launch/finetune.py"), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    import torch

    from medssl_scale.augment.policy import IMAGENET_MEAN, IMAGENET_STD
    from medssl_scale.models import build_backbone
    from medssl_scale.train.storage import save_encoder

    root = tmp_path_factory.mktemp("bad-input")
    src = root / "images"
    rows = []
    for p in range(40):
        for k in range(1 + p % 2):
            rel = f"img/p{p:02d}_{k}.jpg"
            write_image(src / rel, seed=p * 10 + k, size=(32, 32))
            rows.append({"path": rel, "pid": f"pat{p:02d}", "dx": CLASSES[p % 3]})
    write_csv(src / "rows.csv", rows)
    common = ["--manifest", src / "rows.csv", "--patient-col", "pid", "--label-cols", "dx", "--workers", "1",
              "--quiet"]
    shards = root / "shards"
    run_cli("build", src, shards, *common, "--splits", "train=0.6,val=0.2,test=0.2")
    no_val = root / "shards-no-val"
    run_cli("build", src, no_val, *common, "--splits", "train=0.7,test=0.3")
    assert set(read_manifest(shards)["splits"]) == {"train", "val", "test"}
    assert set(read_manifest(no_val)["splits"]) == {"train", "test"}

    torch.manual_seed(0)
    encoder = root / "r18-small.encoder.pt"  # what pretraining writes: weights + architecture
    save_encoder(build_backbone(18, 1, small_input=True).state_dict(), str(encoder),
                 arch={"depth": 18, "width": 1, "small_input": True, "input_size": 32, "mean": list(IMAGENET_MEAN),
                       "std": list(IMAGENET_STD), "preset": "simclr", "feature_dim": 512})
    r34 = root / "resnet34.pth"  # a torchvision-format state_dict (its fc.* included), no architecture
    state = build_backbone(34, 1).state_dict()
    state.update({"fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)})
    torch.save(state, r34)
    return {"shards": shards, "no_val": no_val, "encoder": encoder, "r34": r34}


CASES = {
    # id: (arguments after the mode; {data} and {tmp} filled in, what the one line must contain)
    "encoder_arch": (["encoder={encoder}", "model.depth=50"],
                     ["encoder=", "depth=18", "model.depth=50"]),
    "state_dict_shape": (["encoder={r34}", "model.depth=18"],
                         ["encoder=", "ResNet-18", "model.depth"]),
    "shards_missing": (["data.shards={tmp}/no-such-build"], ["data.shards=", "no-such-build", "manifest.json"]),
    "label_column": (["task.column=nope"], ["'nope'", "task.column", "dx"]),
    "test_split": (["data.test_split=nope"], ["data.test_split=nope", "no split 'nope'"]),
    "val_split": (["data.shards={no_val}"], ["data.val_split=val", "no split 'val'"]),
    "label_fraction": (["label_fraction=0.01"], ["label_fraction=0.01", "labels_per_class"]),
    "multilabel_on_single_label": (["task.type=multilabel", "task.columns=[dx]"],
                                   ["task.type=multilabel", "'dx'", "task.type=multiclass"]),
    "same_split_twice": (["data.val_split=test"], ["data.val_split", "data.test_split", "'test'"]),
    "empty_encoder": (["encoder="], ["encoder is empty", "encoder=null"]),
    "run_dir_under_a_file": (["run_dir={tmp}/a-file/run"], ["run_dir=", "a-file", "file, not a folder"]),
    "run_dir_in_proc": (["run_dir=/proc/forbidden"], ["run_dir=/proc/forbidden", "cannot be written"]),
    "evaluate_without_classifier": (["evaluate"], ["evaluate needs classifier="]),
    "evaluate_classifier_not_a_model": (["evaluate", "classifier={encoder}"], ["classifier=", "not a model.pt"]),
    "evaluate_classifier_text_file": (["evaluate", "classifier={tmp}/a-file"], ["classifier=", "not a model.pt"]),
}


ENCODER_CASES = {"encoder_arch", "state_dict_shape"}
SUBPROCESS_CASES = ["encoder_arch", "evaluate_classifier_not_a_model"]


def _argv(case: str, data: dict, tmp_path: Path) -> tuple[list[str], list[str], Path]:
    """The command line of `case` (its run folder under tmp_path) and what its one line must contain."""
    args, needles = CASES[case]
    (tmp_path / "a-file").write_text("a regular file\n")
    run_dir = tmp_path / "runs" / "run"
    fill = {**{k: str(v) for k, v in data.items()}, "tmp": str(tmp_path)}
    args = [a.format(**fill) for a in args]
    mode = ["evaluate"] if args[:1] == ["evaluate"] else []
    argv = [*mode, "--config", "configs/ham_linear.yaml", f"data.shards={data['shards']}", f"run_dir={run_dir}",
            *SMALL, *args[len(mode):]]
    return argv, needles, run_dir


def _check_line(stderr: str, needles: list[str]) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("finetune: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


def _nothing_written(run_dir: Path) -> None:
    for name in ("config.yaml", "model.pt", "metrics.json", "predictions.csv"):
        assert not (run_dir / name).exists(), name
    assert not (run_dir.parent / ".feature-cache").exists()


@pytest.fixture(scope="module")
def launcher():
    """launch/finetune.py as a module: its main(argv) returns the exit status."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("finetune_launcher", ROOT / "launch/finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_before_any_model_work(case, data, launcher, tmp_path, monkeypatch, capsys):
    """In process, so each case costs no interpreter start, and the model steps can be made to fail loudly:
    data and config errors come before the encoder is built, encoder errors before any Accelerator."""
    from medssl_scale.finetune import job

    def forbidden(what):
        def boom(*a, **k):
            raise AssertionError(f"{what} was called before the error was found")
        return boom

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(job, "make_accelerator", forbidden("make_accelerator"))
    monkeypatch.setattr(job, "SavedModel", forbidden("SavedModel"))
    if case not in ENCODER_CASES:
        monkeypatch.setattr(job, "load_encoder_for_eval", forbidden("load_encoder_for_eval"))
    argv, needles, run_dir = _argv(case, data, tmp_path)
    code = launcher.main(argv)
    out = capsys.readouterr()
    assert code == 2, f"exit {code}\nstdout:\n{out.out[-2000:]}\nstderr:\n{out.err[-3000:]}"
    _check_line(out.err, needles)
    _nothing_written(run_dir)


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_bad_input_subprocess_exit_status_and_one_stderr_line(case, data, tmp_path):
    """The same contract from a fresh interpreter (import-time output included), for a few of the cases."""
    argv, needles, run_dir = _argv(case, data, tmp_path)
    p = _finetune(*argv)
    assert p.returncode == 2, f"exit {p.returncode}\nstdout:\n{p.stdout[-2000:]}\nstderr:\n{p.stderr[-3000:]}"
    _check_line(p.stderr, needles)
    _nothing_written(run_dir)
