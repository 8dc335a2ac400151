"""medssl-plot draws metrics.jsonl panels, only those with data, and says what to fix on bad input."""

import json
import math
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

from medssl_scale.train.plot import PANELS, build_figure, load_metrics, main, panels_with_data, plot_runs, series

SCRIPT = Path(sys.executable).parent / "medssl-plot"  # the real console script pip installed
MONITOR = ("knn_top1", "knn_bal_acc", "knn_auc", "linear_top1", "linear_bal_acc", "linear_auc")
NAN = float("nan")


def monitor(step, base):
    return {"step": step, **{k: base + 0.01 * i for i, k in enumerate(MONITOR)}, "monitor_s": 1.5}


def full_records(n=20, seed=0.0):
    """What a real run writes: a step-0 monitor-only record, training steps with collapse statistics
    every 5th step, a monitor result merged into step 10 and the last step, and a few NaN / null holes."""
    records = [monitor(0, 0.30)]
    for s in range(1, n + 1):
        r = {"step": s, "loss": 5.0 - 0.1 * s + seed, "accuracy": 0.04 * s, "lr": 0.01 * min(s, 5),
             "pairs_per_s": 1000.0 + s}
        if s % 5 == 0:
            r.update(embed_std=0.08, align=0.5 + 0.01 * s, uniform=-2.0 - 0.02 * s, pos_cos=0.7, neg_cos=0.05)
        if s in (10, n):
            r.update({k: v for k, v in monitor(s, 0.5).items() if k != "step"})
        records.append(r)
    records[3]["loss"] = NAN
    records[4]["accuracy"] = None
    del records[6]["lr"]
    return records


def write_run(folder: Path, records, out_dim=128) -> Path:
    folder.mkdir(parents=True)
    # json.dumps writes NaN as the bare token NaN and None as null, exactly what the trainer leaves behind.
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if out_dim is not None:
        (folder / "config.yaml").write_text(f"model:\n  depth: 50\n  out_dim: {out_dim}\n")
    return folder


def cli(*args):
    return subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60)


def test_series_skips_nan_null_and_missing():
    steps, values = series(full_records(), "loss")
    assert steps == [s for s in range(1, 21) if s != 3] and all(math.isfinite(v) for v in values)
    assert series(full_records(), "accuracy")[0] == [s for s in range(1, 21) if s != 4]
    assert series(full_records(), "lr")[0] == [s for s in range(1, 21) if s != 6]
    assert series(full_records(), "knn_top1")[0] == [0, 10, 20]
    assert series(full_records(), "embed_std")[0] == [5, 10, 15, 20]


def test_panels_with_data_follow_the_keys_written():
    assert panels_with_data(full_records()) == [name for name, _, _ in PANELS]
    assert panels_with_data([monitor(0, 0.3)]) == ["monitor"]  # a run that has only done its step-0 monitor
    partial = [{"step": 0, "knn_auc": 0.6},
               {"step": 1, "loss": 4.0, "embed_std": NAN, "align": None, "pos_cos": NAN},
               {"step": 2, "loss": 3.9, "lr": None, "neg_cos": None}]
    assert panels_with_data(partial) == ["loss", "monitor"]  # NaN-only / null-only keys draw nothing
    assert panels_with_data([{"step": 1, "align": NAN, "uniform": -2.0}]) == ["align_uniform"]


def test_one_axes_per_panel_and_the_embed_std_reference(tmp_path):
    fig = build_figure([full_records()], ["run"], [128])
    assert len(fig.axes) == 8
    ax = next(a for a in fig.axes if a.get_title() == "embed_std")
    assert any(list(line.get_ydata()) == [1 / math.sqrt(128)] * 2 for line in ax.lines)
    assert all(a.get_title() != "embed_std" for a in build_figure([[monitor(0, 0.3)]], ["r"], [128]).axes)

    partial = [{"step": 0, "knn_top1": 0.3}, {"step": 1, "loss": 4.0, "embed_std": 0.05}]
    fig = build_figure([partial], ["run"], [None])  # no readable config.yaml: embed_std without its line
    assert [a.get_title() for a in fig.axes] == ["NT-Xent loss", "kNN / linear probe", "embed_std"]
    assert len(fig.axes[2].lines) == 1


def test_console_script_writes_a_png_next_to_the_run(tmp_path):
    run = write_run(tmp_path / "simclr-r50", full_records())
    proc = cli(run)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(run / "metrics.png")
    assert (run / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    h, w, channels = matplotlib.image.imread(run / "metrics.png").shape
    assert (w, h, channels) == (1500, 1020, 4)  # 8 panels in 3 columns x 3 rows of 5 x 3.4 inches at 100 dpi

    small = write_run(tmp_path / "early", [monitor(0, 0.3), {"step": 1, "loss": 4.0}], out_dim=None)
    out = tmp_path / "early.png"
    assert main([str(small), "--out", str(out)]) == 0
    assert matplotlib.image.imread(out).shape[:2] == (340, 1000)  # 2 panels side by side


def test_several_runs_side_by_side(tmp_path, capsys):
    a = write_run(tmp_path / "a" / "seed0", full_records(seed=0.0))
    b = write_run(tmp_path / "b" / "seed0", full_records(n=30, seed=0.5), out_dim=256)
    c = write_run(tmp_path / "c", [monitor(0, 0.2), {"step": 1, "loss": 4.5}])
    assert main([str(a), str(b), str(c)]) == 0
    out = a / "metrics_compared.png"
    assert capsys.readouterr().out.strip() == str(out)
    assert matplotlib.image.imread(out).ndim == 3

    fig = build_figure([load_metrics(str(d)) for d in (a, b)], ["a/seed0", "b/seed0"], [128, 256])
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["a/seed0", "b/seed0"]
    loss = next(ax for ax in fig.axes if ax.get_title() == "NT-Xent loss")
    # each run: its raw losses (faint) and their running mean, in the run's colour
    assert len(loss.lines) == 4 and loss.lines[0].get_color() == loss.lines[1].get_color() != loss.lines[2].get_color()
    embed = next(ax for ax in fig.axes if ax.get_title() == "embed_std")
    assert {round(line.get_ydata()[0], 4) for line in embed.lines} >= {round(1 / math.sqrt(d), 4) for d in (128, 256)}

    # Equal folder names are told apart by their parent folder; --labels replaces the names.
    from medssl_scale.train.plot import run_labels
    assert run_labels([str(a), str(b), str(c)]) == ["a/seed0", "b/seed0", "c"]
    proc = cli(a, b, "--labels", "lars,adamw", "--out", tmp_path / "cmp.png")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "cmp.png") and (tmp_path / "cmp.png").is_file()
    assert plot_runs([str(a), str(b)], str(tmp_path / "api.png"), ["x", "y"]) == str(tmp_path / "api.png")


def test_bad_input_is_one_line_and_exit_status_2(tmp_path):
    good = write_run(tmp_path / "good", full_records())
    (tmp_path / "no-metrics").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("\n  \n")
    bad = tmp_path / "bad"
    bad.mkdir()
    lines = ['{"step": 0, "knn_top1": 0.3}', '{"step": 1, "loss": 4.0}', '{"step": 2, "loss": 3.']  # truncated
    (bad / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    nostep = write_run(tmp_path / "nostep", [{"step": 0, "loss": 1.0}, {"loss": 2.0}])
    cases = {
        (str(tmp_path / "missing"),): "run folder " + str(tmp_path / "missing") + " does not exist",
        (str(tmp_path / "no-metrics"),): "has no metrics.jsonl",
        (str(tmp_path / "empty"),): str(tmp_path / "empty" / "metrics.jsonl") + " is empty",
        (str(bad),): str(bad / "metrics.jsonl") + " line 3: not valid JSON",
        (str(nostep),): "line 2: not a JSON object with an integer \"step\"",
        (str(good), "--labels", "a,b"): "--labels has 2 names for 1 runs",
        (str(good), "--out", str(tmp_path / "nope" / "x.png")):
            "the folder " + str(tmp_path / "nope") + " does not exist",
    }
    for args, needle in cases.items():
        proc = cli(*args)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (args, proc.stderr)
        assert len(err) == 1 and err[0].startswith("medssl-plot: error: ") and needle in err[0], (args, err)
    assert not (good / "metrics.png").exists()


@pytest.mark.parametrize("records", [[{"step": 0, "loss": NAN}], [{"step": 0}, {"step": 1, "accuracy": None}]])
def test_nothing_to_plot_is_an_error_too(tmp_path, capsys, records):
    run = write_run(tmp_path / "r", records)
    assert main([str(run)]) == 2
    assert "no plottable values" in capsys.readouterr().err


def test_running_mean_is_the_centred_window_mean():
    from medssl_scale.train.plot import running_mean

    # window 3: each value's neighbours on both sides; at the ends only those that exist
    assert running_mean([1.0, 2.0, 6.0, 3.0], 3) == [1.5, 3.0, 11 / 3, 4.5]
