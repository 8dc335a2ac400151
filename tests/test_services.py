"""Smoke tests of the real test services: an sbatch/srun job on the Slurm cluster and an S3 round trip."""
import os
import sys

import pytest


@pytest.mark.slurm
def test_sbatch_srun_two_tasks(slurm_cluster, tmp_path):
    # Each srun task writes its own rank file, proving both tasks ran and saw distinct SLURM_PROCIDs.
    task = tmp_path / "task.py"
    task.write_text(
        "import os, pathlib\n"
        "rank = os.environ['SLURM_PROCID']\n"
        "pathlib.Path(__file__).with_name(f'rank{rank}.txt').write_text(rank)\n"
    )
    job = tmp_path / "job.sh"
    job.write_text(f"#!/bin/bash\nset -euo pipefail\nsrun {sys.executable} {task}\n")

    job_id = slurm_cluster.submit(job, "--ntasks=2", "--job-name=services-smoke", cwd=tmp_path)
    state = slurm_cluster.wait(job_id, timeout=120)

    assert state == "COMPLETED", slurm_cluster.output(job_id)
    ranks = {p.read_text() for p in tmp_path.glob("rank*.txt")}
    assert ranks == {"0", "1"}


@pytest.mark.s3
def test_s3_round_trip(s3_endpoint):
    import fsspec

    s3_endpoint.make_bucket("medssl-test")
    payload = os.urandom(1 << 16)
    # Plain fsspec calls, no endpoint arguments: the fixture's AWS_* environment must be enough.
    with fsspec.open("s3://medssl-test/dir/blob.bin", "wb") as f:
        f.write(payload)
    fs = fsspec.filesystem("s3")
    assert fs.ls("medssl-test/dir", detail=False) == ["medssl-test/dir/blob.bin"]
    with fsspec.open("s3://medssl-test/dir/blob.bin", "rb") as f:
        assert f.read() == payload
    # Read it back through an explicit client too, so the bytes demonstrably live on moto.
    body = s3_endpoint.client().get_object(Bucket="medssl-test", Key="dir/blob.bin")["Body"].read()
    assert body == payload
