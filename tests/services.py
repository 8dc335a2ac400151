"""Pytest plugin with real test services: a one-node Slurm cluster on loopback and a moto S3 endpoint."""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# Daemons live in /usr/sbin, which non-root PATHs often lack.
SEARCH_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
MUNGE_SOCKET_DIR = Path("/run/munge")
MUNGE_KEY = Path("/etc/munge/munge.key")
# Terminal job states as scontrol reports them; anything else means still queued/running.
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _need(binary: str) -> str:
    """Path of a service binary; a missing one FAILS the test (never skips: CI must run the real thing)."""
    path = shutil.which(binary, path=SEARCH_PATH)
    if path is None:
        pytest.fail(f"{binary} not found; run `make system` (apt-get install slurm-wlm munge)", pytrace=False)
    return path


def _free_port() -> int:
    # Ask the kernel for an unused port; a tiny race with other processes is acceptable for tests.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 30) -> str:
    try:
        return f"--- {path} ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"--- {path} (missing) ---"


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- munge

def _munge_works() -> bool:
    """True when a munged answers on the default socket (what Slurm's auth/munge uses)."""
    if not (shutil.which("munge", path=SEARCH_PATH) and shutil.which("unmunge", path=SEARCH_PATH)):
        return False
    cred = subprocess.run(["munge", "-n"], capture_output=True, env={**os.environ, "PATH": SEARCH_PATH})
    if cred.returncode != 0:
        return False
    ok = subprocess.run(["unmunge"], input=cred.stdout, capture_output=True,
                        env={**os.environ, "PATH": SEARCH_PATH})
    return ok.returncode == 0


def _ensure_munged() -> None:
    """Start munged as the `munge` user if none answers. It is left running afterwards on purpose:
    it is a shared system daemon that another concurrent test session may be relying on."""
    for tool in ("munge", "unmunge"):
        _need(tool)
    if _munge_works():
        return
    munged = _need("munged")
    try:
        user = pwd.getpwnam("munge")
    except KeyError:
        pytest.fail("no `munge` user; install the Debian munge package (`make system`)", pytrace=False)
    if os.geteuid() != 0:
        pytest.fail("munged is not running and starting it needs root", pytrace=False)
    if not MUNGE_KEY.exists():
        # Package install normally creates the key; a hand-wiped machine may lack it.
        subprocess.run([_need("mungekey"), "--create", "--keyfile", str(MUNGE_KEY)], check=True)
        os.chown(MUNGE_KEY, user.pw_uid, user.pw_gid)
    # /run is a tmpfs in containers, so the socket directory vanishes on every fresh boot.
    MUNGE_SOCKET_DIR.mkdir(parents=True, exist_ok=True)
    os.chown(MUNGE_SOCKET_DIR, user.pw_uid, user.pw_gid)
    MUNGE_SOCKET_DIR.chmod(0o755)
    stale_pid = MUNGE_SOCKET_DIR / "munged.pid"
    stale_pid.unlink(missing_ok=True)
    run = subprocess.run(["runuser", "-u", "munge", "--", munged], capture_output=True, text=True)
    for _ in range(50):
        if _munge_works():
            return
        time.sleep(0.1)
    pytest.fail(f"munged did not come up (rc={run.returncode}): {run.stderr}\n"
                + _tail(Path("/var/log/munge/munged.log")), pytrace=False)


# ---------------------------------------------------------------- slurm

@dataclass
class SlurmCluster:
    """Handle on the running test cluster. `env` holds only the extra variables; merge it into os.environ."""
    conf: Path
    log_dir: Path
    env: dict = field(default_factory=dict)

    def run(self, *cmd: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True,
                              env={**os.environ, "PATH": SEARCH_PATH, **self.env}, **kw)

    def submit(self, script: str | os.PathLike, *sbatch_args: str, cwd: str | os.PathLike | None = None) -> str:
        """sbatch the script; job output defaults to log_dir/job-<id>.out. Returns the job id."""
        args = list(sbatch_args)
        if not any(a.startswith(("-o", "--output")) for a in args):
            args.append(f"--output={self.log_dir}/job-%j.out")
        res = self.run("sbatch", "--parsable", *args, str(script), cwd=cwd)
        if res.returncode != 0:
            raise RuntimeError(f"sbatch failed: {res.stderr.strip()}")
        return res.stdout.strip().split(";")[0]  # --parsable prints "id" or "id;cluster"

    def state(self, job_id: str) -> str:
        res = self.run("scontrol", "show", "job", "-o", str(job_id))
        for word in res.stdout.split():
            if word.startswith("JobState="):
                return word.split("=", 1)[1]
        raise RuntimeError(f"scontrol knows no job {job_id}: {res.stdout}{res.stderr}")

    def wait(self, job_id: str, timeout: float = 300) -> str:
        """Poll scontrol (no slurmdbd, so no sacct) until the job ends; returns the final state."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state(job_id)
            if state in FINAL_STATES:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {state} after {timeout}s")

    def output(self, job_id: str) -> str:
        return (self.log_dir / f"job-{job_id}.out").read_text(errors="replace")


def _slurm_conf(root: Path) -> str:
    host = socket.gethostname().split(".")[0]  # what `hostname -s` prints; slurmd matches NodeName on it
    cpus = len(os.sched_getaffinity(0))  # as nproc, honouring container CPU limits
    mem_kb = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal:"))
    # Declare a little less memory than exists: more than slurmd measures would drain the node.
    mem_mb = int(mem_kb / 1024 * 0.9)
    user = pwd.getpwuid(os.geteuid()).pw_name  # root in CI, the tested set-up
    # Explicit 127.0.0.1 addresses: the cluster stays on loopback even where the hostname has no DNS entry.
    return f"""\
ClusterName=medssl-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
SlurmUser={user}
SlurmdUser={user}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
# No mail on this box; an unset MailProg only adds an error line to the log.
MailProg=/bin/true
# Finished jobs must stay visible to `scontrol show job` long enough for wait() to see them.
MinJobAge=3600
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real slurmctld + slurmd on this host, private config and state in a fresh temp dir."""
    slurmctld, slurmd = _need("slurmctld"), _need("slurmd")
    for tool in ("sbatch", "srun", "scontrol", "sinfo", "scancel"):
        _need(tool)
    _ensure_munged()

    # A fresh dir per session: no stale pid/state files from an earlier run, and concurrent
    # sessions on one machine each get their own ports and spool.
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir()
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root))
    cluster = SlurmCluster(conf=conf, log_dir=root / "log", env={"SLURM_CONF": str(conf)})

    # -D keeps the daemons in the foreground as our children, so teardown can stop exactly them.
    daemons = []
    try:
        for binary, name, extra in ((slurmctld, "slurmctld", ["-c"]), (slurmd, "slurmd", [])):
            with open(root / "log" / f"{name}.stderr", "w") as err:
                daemons.append(subprocess.Popen([binary, "-D", *extra, "-f", str(conf)],
                                                stdout=err, stderr=subprocess.STDOUT,
                                                env={**os.environ, **cluster.env}))
        deadline = time.monotonic() + 60
        while True:
            states = cluster.run("sinfo", "-h", "-N", "-o", "%T").stdout.split()
            if states and all(s == "idle" for s in states):
                break
            dead = [d.args[0] for d in daemons if d.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(_tail(p) for p in sorted((root / "log").iterdir()))
                pytest.fail(f"slurm node never became idle (sinfo: {states}, exited: {dead})\n{logs}",
                            pytrace=False)
            time.sleep(0.5)
        yield cluster
    finally:
        if daemons:
            cluster.run("scancel", "--partition=debug")  # no job steps outlive the cluster
        for proc in reversed(daemons):
            _stop(proc)


# ---------------------------------------------------------------- S3

@dataclass
class S3Endpoint:
    """Handle on the moto server; while the fixture is active os.environ points AWS clients at it."""
    url: str
    env: dict

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.url, region_name=self.env["AWS_DEFAULT_REGION"],
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def make_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)


def _clear_s3fs_cache() -> None:
    # s3fs caches filesystem instances (with their endpoint) per argument set; drop them so
    # nothing built before or during the fixture leaks across the environment change.
    try:
        import s3fs
    except ImportError:
        return
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """moto_server on 127.0.0.1 with AWS_* env vars set so fsspec/s3fs/botocore use it unmodified."""
    # Prefer the server installed next to the running interpreter (the venv), not one on PATH.
    local = Path(sys.executable).parent / "moto_server"
    binary = str(local) if local.exists() else shutil.which("moto_server")
    if binary is None:
        pytest.fail("moto_server not found; run `make venv` (moto[server] is in requirements.lock)",
                    pytrace=False)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(port)], stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto_server did not answer on {url}\n{_tail(log)}", pytrace=False)
                time.sleep(0.2)
        env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            # These would override or confuse the endpoint/credentials above.
            for key in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
                mp.delenv(key, raising=False)
            _clear_s3fs_cache()
            yield S3Endpoint(url=url, env=env)
            _clear_s3fs_cache()
    finally:
        _stop(proc)
