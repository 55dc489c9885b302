"""A throwaway one-node Slurm cluster on 127.0.0.1 for the test suite (stdlib only).

Library use::

    cluster = running_cluster_from_env() or SlurmCluster.start(tmp_path / "slurm")
    subprocess.run(["sbatch", ...], env=cluster.env)
    cluster.stop()

Script use (e.g. CI starts the cluster once, before pytest)::

    python3 tests/slurm_cluster.py start STATE_DIR && source STATE_DIR/env.sh
    python3 tests/slurm_cluster.py stop STATE_DIR

Needs root (slurmd runs jobs as their submitting user) and Debian's slurm-wlm + munge.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])

SLURM_CONF = """\
ClusterName=opttest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# Own munged socket; cred_expire=10 lets a requeued job start again after ~10 s, not ~120 s.
AuthInfo=socket={munge_socket},cred_expire=10
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/spool
SlurmctldPidFile={state}/run/slurmctld.pid
SlurmdPidFile={state}/run/slurmd.pid
# No cgroups: containers/CI runners rarely allow them, and the tests only need process tracking.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1,preempt_send_user_signal
# Short timers so tests don't wait on the production defaults (minutes).
MinJobAge={min_job_age}
KillWait=5
JobRequeue=1
ReturnToService=2
SlurmdParameters=config_overrides
# Real preemption: a job in "urgent" (higher tier) requeues the jobs of "debug" it needs the
# CPUs of; they get their --signal at once and GraceTime seconds to save before SIGTERM.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=30
PartitionName=urgent Nodes={node} MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
"""


def ensure_slurm_installed() -> str | None:
    """None when Slurm + munge are usable (installing them with apt if needed), else a reason."""
    if all(shutil.which(b, path=SBIN_PATH) for b in ("sbatch", *DAEMONS)):
        return None
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return "slurm-wlm/munge missing, and no apt-get (or not root) to install them"
    cmd = ["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:  # a fresh machine may have no package lists yet
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return "apt-get install slurm-wlm munge timed out after 600 s"
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["?"]
        return f"apt-get install slurm-wlm munge failed (rc={res.returncode}): {tail[0]}"
    return None


def _free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free TCP port")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"<{exc}>"


def _pid_is(pid: int, name: str) -> bool:
    """True while `pid` is a live (non-zombie) `name` process; guards against reused PIDs."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return comm == name and state != "Z"


def _wait_for(pred, timeout: float, abort=lambda: False) -> bool:
    """Poll `pred` every 0.2 s until it holds (True), `abort()` holds or time runs out (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not abort():
        if pred():
            return True
        time.sleep(0.2)
    return False


class SlurmCluster:
    def __init__(self, state_dir: Path, node_name: str, pids: dict[str, int], procs=()):
        self.state_dir = state_dir
        self.conf_path = state_dir / "slurm.conf"
        self.node_name = node_name
        self.pids = pids  # empty for a cluster we merely attached to (not ours to stop)
        self._procs = {p.pid: p for p in procs}
        # Drop SLURM_* inherited from an outer job (e.g. CI inside Slurm): sbatch would obey them.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        self.env["SLURM_CONF"] = str(self.conf_path)

    @classmethod
    def start(
        cls, state_dir: Path, *, detach: bool = False, min_job_age: int = 30, timeout: float = 30
    ) -> SlurmCluster:
        state_dir = Path(state_dir).resolve()
        sbin = {n: shutil.which(n, path=SBIN_PATH) for n in DAEMONS}
        if missing := [n for n, path in sbin.items() if path is None]:
            raise RuntimeError(f"Slurm daemons not installed: {missing}")
        for sub in ("ctld", "spool", "run", "log"):
            (state_dir / sub).mkdir(parents=True, exist_ok=True)
        # munged insists every parent of its socket is world-traversable, which pytest's tmp
        # dirs are not, so its runtime dir lives in /tmp (short path: AF_UNIX limit is 108).
        munge_dir = Path(tempfile.mkdtemp(prefix="opt-munge-", dir="/tmp"))
        (state_dir / "munge_dir").write_text(str(munge_dir))
        munge_dir.chmod(0o755)
        key = munge_dir / "munge.key"  # private key: independent of any system munged
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        munge_user = pwd.getpwnam("munge")
        for p in (munge_dir, key):
            os.chown(p, munge_user.pw_uid, munge_user.pw_gid)

        node = socket.gethostname().split(".")[0]  # slurmd only starts if this matches NodeName
        mem_mb = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2**20
        (state_dir / "slurm.conf").write_text(
            SLURM_CONF.format(
                node=node,
                state=state_dir,
                munge_socket=munge_dir / "munge.socket",
                ctld_port=_free_port(16817),
                slurmd_port=_free_port(16818),
                cpus=os.cpu_count() or 1,
                mem_mb=max(1, mem_mb // 2),  # below the real amount, else slurmd drains the node
                min_job_age=min_job_age,
            )
        )
        env = dict(os.environ, SLURM_CONF=str(state_dir / "slurm.conf"))
        m = munge_dir
        cmds = {
            "munged": [
                sbin["munged"],
                "-F",
                f"--socket={m}/munge.socket",
                f"--key-file={key}",
                f"--pid-file={m}/munged.pid",
                f"--seed-file={m}/munged.seed",
            ],
            "slurmctld": [sbin["slurmctld"], "-D", "-c"],  # -c: forget jobs of an earlier run
            "slurmd": [sbin["slurmd"], "-D", "-N", node],
        }
        procs = []
        for name, cmd in cmds.items():
            as_munge = {"user": "munge", "group": "munge"} if name == "munged" else {}
            # detach: a new session, so that the daemons outlive the `start` script.
            with open(state_dir / "log" / f"{name}.log", "ab") as log:
                proc = subprocess.Popen(
                    cmd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=detach,
                    **as_munge,
                )
            procs.append(proc)
            if name == "munged":  # Slurm daemons fail to authenticate until the socket exists
                _wait_for(lambda: (munge_dir / "munge.socket").exists(), 10)
        cluster = cls(state_dir, node, {n: p.pid for n, p in zip(cmds, procs, strict=True)}, procs)
        (state_dir / "pids").write_text("".join(f"{n} {p}\n" for n, p in cluster.pids.items()))
        (state_dir / "env.sh").write_text(f"export SLURM_CONF={cluster.conf_path}\n")
        if not _wait_for(cluster._node_idle, timeout, abort=lambda: bool(cluster._dead())):
            dead = cluster._dead()
            logs = "\n".join(
                f"--- {n}.log ---\n{_tail(state_dir / 'log' / f'{n}.log')}" for n in DAEMONS
            )
            cluster.stop()
            why = f"daemon(s) exited: {', '.join(dead)}" if dead else f"not idle after {timeout} s"
            raise RuntimeError(f"Slurm test cluster failed to start ({why})\n{logs}")
        return cluster

    def __enter__(self) -> SlurmCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _dead(self) -> list[str]:
        """Daemons that have exited. Our own children are asked directly (poll): /proc's
        name of a process that is starting up can briefly differ from its final one."""

        def exited(name: str, pid: int) -> bool:
            if pid in self._procs:
                return self._procs[pid].poll() is not None
            return not _pid_is(pid, name)

        return [n for n, pid in self.pids.items() if exited(n, pid)]

    def _run(self, *cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=15)

    def _node_idle(self) -> bool:
        res = self._run("sinfo", "-h", "-n", self.node_name, "-o", "%T")
        return res.returncode == 0 and res.stdout.strip() == "idle"

    def stop(self, timeout: float = 15) -> None:
        """Cancel leftover jobs (their slurmstepds outlive slurmd), then end our daemons."""
        if not self.pids:
            return
        if "slurmctld" not in self._dead():
            self._run("scancel", "--partition=debug")
            _wait_for(lambda: not self._run("squeue", "-h", "-t", "R,CG").stdout.strip(), 10)
        # Reverse start order: slurmd/slurmctld may still talk to munged while shutting down.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for name, pid in reversed(self.pids.items()):
                if _pid_is(pid, name):
                    os.kill(pid, sig)
            if _wait_for(lambda: len(self._dead()) == len(self.pids), timeout):
                break
        for proc in self._procs.values():
            proc.wait()  # reap our children so they don't linger as zombies
        self.pids = {}
        munge_dir = self.state_dir / "munge_dir"
        if munge_dir.exists():
            shutil.rmtree(munge_dir.read_text().strip(), ignore_errors=True)
            munge_dir.unlink()


def running_cluster_from_env() -> SlurmCluster | None:
    """A handle to a test cluster started outside pytest (via $SLURM_CONF), if it answers."""
    conf = Path(os.environ.get("SLURM_CONF") or "/nonexistent")
    # Only ever attach to our own throwaway cluster, never to a real one that SLURM_CONF names.
    if not conf.is_file() or "ClusterName=opttest\n" not in conf.read_text():
        return None
    try:
        res = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0 or "UP" not in res.stdout:
        return None
    for line in conf.read_text().splitlines():
        if line.startswith("NodeName="):
            node = line.split()[0].split("=", 1)[1]
            return SlurmCluster(conf.parent, node, pids={})
    return None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in ("start", "stop"):
        print(f"usage: {sys.argv[0]} start|stop STATE_DIR", file=sys.stderr)
        return 2
    state_dir = Path(args[1]).resolve()
    if args[0] == "start":
        if reason := ensure_slurm_installed():
            print(reason, file=sys.stderr)
            return 1
        cluster = SlurmCluster.start(state_dir, detach=True)
        print(f"Slurm node {cluster.node_name} idle; source {state_dir / 'env.sh'}")
        return 0
    pids = dict(line.split() for line in (state_dir / "pids").read_text().splitlines())
    node = socket.gethostname().split(".")[0]
    SlurmCluster(state_dir, node, {n: int(p) for n, p in pids.items()}).stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
