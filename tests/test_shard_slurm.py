"""A Slurm job array builds the same shards as one local process (real sbatch on the test cluster)."""

from __future__ import annotations

import pytest

from shardtools import REPO, make_patient_tree, read_manifest, run_cli, shard_hashes

pytestmark = pytest.mark.slurm


def test_slurm_array_build_equals_local_build(slurm_cluster, tmp_path):
    src = tmp_path / "src"
    make_patient_tree(src, patients=30, images_of=lambda p: 1 + p % 4)
    args = ["--patient-regex", r"^(P\d+)/", "--shard-size", "20KB", "--max-side", "40"]
    local = tmp_path / "local"
    run_cli("build", src, local, *args, "--quiet")

    out = tmp_path / "array"
    python = REPO / ".venv" / "bin" / "python"
    # Array ids need not start at 0: the tool rebases SLURM_ARRAY_TASK_ID on SLURM_ARRAY_TASK_MIN.
    res = slurm_cluster.run("sbatch", "--parsable", "--array=3-5", "--cpus-per-task=1",
                            f"--export=ALL,MEDSSL_PYTHON={python}",
                            f"--output={slurm_cluster.log_dir}/shard-%A_%a.out",
                            str(REPO / "launch" / "slurm" / "shard.sbatch"), str(src), str(out), *args,
                            cwd=REPO)
    assert res.returncode == 0, res.stderr
    job = res.stdout.strip().split(";")[0]
    for task in (3, 4, 5):
        state = slurm_cluster.wait(f"{job}_{task}", timeout=300)
        log = (slurm_cluster.log_dir / f"shard-{job}_{task}.out").read_text()
        assert state == "COMPLETED", log
    assert shard_hashes(out) == shard_hashes(local)
    assert read_manifest(out)["splits"] == read_manifest(local)["splits"]
