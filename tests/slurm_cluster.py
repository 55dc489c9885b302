"""A throwaway Slurm cluster of several nodes on one machine, for the test suite (stdlib only).

Each compute node is a real `slurmd` in its own network and UTS namespace: its own hostname
(node1, node2, ...), its own address on a bridge (10.77.X.11, .12, ...) and its own
/etc/hosts (bind-mounted in the node's mount namespace) naming every node, so the jobs it
starts resolve and reach the other nodes as on a real cluster, and gloo binds to the node's
own address. `slurmctld` and `munged` run in the host's namespaces; slurmctld listens on
the bridge. A node can be taken away for real (`kill_node`: its link goes down and every
process in its namespace is SIGKILLed, as at a power loss) and brought back (`revive_node`).

Library use::

    cluster = running_cluster_from_env() or SlurmCluster.start(tmp_path / "slurm")
    subprocess.run(["sbatch", ...], env=cluster.env)
    cluster.stop()

Script use (e.g. CI starts the cluster once, before pytest)::

    python3 tests/slurm_cluster.py start STATE_DIR && source STATE_DIR/env.sh
    python3 tests/slurm_cluster.py stop STATE_DIR

Needs root (network namespaces, and slurmd runs jobs as their submitting user), iproute2,
util-linux's `unshare`, and Debian's slurm-wlm + munge (installed with apt when missing).
"""

from __future__ import annotations

import contextlib
import hashlib
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
NODES = 3  # a 2-node job, and a spare to resume on when one of its nodes dies
CPUS_PER_NODE = 2

SLURM_CONF = """\
ClusterName=opttest
SlurmctldHost={ctld_host}({ctld_addr})
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# Own munged socket; cred_expire=10 lets a requeued job start again after ~10 s, not ~120 s.
AuthInfo=socket={munge_socket},cred_expire=10
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/spool/%n
SlurmctldPidFile={state}/run/slurmctld.pid
SlurmdPidFile={state}/run/slurmd-%n.pid
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
# Short timers so tests don't wait on the production defaults (minutes): a node that stops
# answering is DOWN after SlurmdTimeout, and its jobs fail (NODE_FAIL) and requeue.
MinJobAge={min_job_age}
KillWait=5
SlurmdTimeout=12
JobRequeue=1
ReturnToService=2
SlurmdParameters=config_overrides
# Real preemption: a job in "urgent" (higher tier) requeues the jobs of "debug" it needs the
# CPUs of; they get their --signal at once and GraceTime seconds to save before SIGTERM.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
{node_lines}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=30
PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
"""


def ensure_slurm_installed() -> str | None:
    """None when the cluster can be made here (installing Slurm, munge and iproute2 with apt
    if needed), else one line saying why not."""
    if os.geteuid() != 0:
        return ("the Slurm tests need root: slurmd runs jobs as their submitting user and the "
                "nodes are network namespaces; run them as root, or deselect them: -m 'not slurm'")  # fmt: skip
    needed = {"sbatch": "slurm-wlm", **dict.fromkeys(DAEMONS[1:], "slurm-wlm"),
              "munged": "munge", "ip": "iproute2", "unshare": "util-linux", "nsenter": "util-linux"}  # fmt: skip
    missing = sorted({pkg for b, pkg in needed.items() if not shutil.which(b, path=SBIN_PATH)})
    if not missing:
        return None
    if shutil.which("apt-get") is None:
        return f"{', '.join(missing)} missing, and no apt-get to install them"
    cmd = ["apt-get", "install", "-y", "-q", *missing]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:  # a fresh machine may have no package lists yet
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return f"apt-get install {' '.join(missing)} timed out after 600 s"
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["?"]
        return f"apt-get install {' '.join(missing)} failed (rc={res.returncode}): {tail[0]}"
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


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {res.stderr.strip() or res.stdout.strip()}")
    return res


class Network:
    """The nodes' network: a bridge in the host's namespace (the controller's address) and,
    per node, a network namespace joined to it by a veth pair. Names carry a tag made from
    the state directory, so two clusters (and their leftovers) never collide."""

    def __init__(self, state_dir: Path, nodes: int):
        digest = hashlib.sha1(str(state_dir).encode()).hexdigest()
        self.tag = digest[:4]
        self.subnet = f"10.77.{int(digest[4:8], 16) % 250}"
        self.bridge = f"optbr{self.tag}"
        self.ctld_addr = f"{self.subnet}.1"
        self.nodes = {
            f"node{i}": {
                "netns": f"opt{self.tag}n{i}",
                "veth": f"opt{self.tag}v{i}",
                "addr": f"{self.subnet}.{10 + i}",
            }
            for i in range(1, nodes + 1)
        }

    def create(self) -> None:
        self.delete()  # leftovers of a cluster that was killed before it could clean up
        _sh("ip", "link", "add", self.bridge, "type", "bridge")
        _sh("ip", "addr", "add", f"{self.ctld_addr}/24", "dev", self.bridge)
        _sh("ip", "link", "set", self.bridge, "up")
        for node in self.nodes.values():
            ns, veth = node["netns"], node["veth"]
            _sh("ip", "netns", "add", ns)
            _sh("ip", "link", "add", veth, "type", "veth", "peer", "name", f"{veth}p")
            _sh("ip", "link", "set", f"{veth}p", "netns", ns)
            _sh("ip", "link", "set", veth, "master", self.bridge, "up")
            inside = ("ip", "netns", "exec", ns, "ip")
            _sh(*inside, "link", "set", f"{veth}p", "name", "eth0")
            _sh(*inside, "addr", "add", f"{node['addr']}/24", "dev", "eth0")
            _sh(*inside, "link", "set", "eth0", "up")
            _sh(*inside, "link", "set", "lo", "up")

    def pids(self, name: str) -> list[int]:
        res = _sh("ip", "netns", "pids", self.nodes[name]["netns"], check=False)
        return [int(p) for p in res.stdout.split()]

    def delete(self) -> None:
        for name, node in self.nodes.items():
            if Path(f"/run/netns/{node['netns']}").exists():
                for pid in self.pids(name):  # jobs' processes outlive slurmd
                    _kill(pid, signal.SIGKILL)
                _sh("ip", "netns", "del", node["netns"], check=False)
            _sh("ip", "link", "del", node["veth"], check=False)
        _sh("ip", "link", "del", self.bridge, check=False)


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


class SlurmCluster:
    def __init__(self, state_dir: Path, nodes: list[str], pids: dict[str, int], procs=()):
        self.state_dir = state_dir
        self.conf_path = state_dir / "slurm.conf"
        self.nodes = nodes
        self.network = Network(state_dir, len(nodes))
        self.pids = pids  # empty for a cluster we merely attached to (not ours to stop)
        self._procs = {p.pid: p for p in procs}
        # Drop SLURM_* inherited from an outer job (e.g. CI inside Slurm): sbatch would obey them.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        self.env["SLURM_CONF"] = str(self.conf_path)

    @classmethod
    def start(
        cls,
        state_dir: Path,
        *,
        nodes: int = NODES,
        detach: bool = False,
        min_job_age: int = 30,
        timeout: float = 60,
    ) -> SlurmCluster:
        state_dir = Path(state_dir).resolve()
        sbin = {n: shutil.which(n, path=SBIN_PATH) for n in DAEMONS}
        if missing := [n for n, path in sbin.items() if path is None]:
            raise RuntimeError(f"Slurm daemons not installed: {missing}")
        for sub in ("ctld", "spool", "run", "log"):
            (state_dir / sub).mkdir(parents=True, exist_ok=True)
        # munged insists every parent of its socket is world-traversable, which pytest's tmp
        # dirs are not, so its runtime dir lives in /tmp (short path: AF_UNIX limit is 108).
        # A path-named Unix socket is reached from every network namespace.
        munge_dir = Path(tempfile.mkdtemp(prefix="opt-munge-", dir="/tmp"))
        (state_dir / "munge_dir").write_text(str(munge_dir))
        munge_dir.chmod(0o755)
        key = munge_dir / "munge.key"  # private key: independent of any system munged
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        munge_user = pwd.getpwnam("munge")
        for p in (munge_dir, key):
            os.chown(p, munge_user.pw_uid, munge_user.pw_gid)

        network = Network(state_dir, nodes)
        network.create()
        ctld_host = socket.gethostname().split(".")[0]  # slurmctld only starts if it matches
        hosts = ["127.0.0.1 localhost", f"{network.ctld_addr} {ctld_host}"]
        hosts += [f"{node['addr']} {name}" for name, node in network.nodes.items()]
        (state_dir / "hosts").write_text("\n".join(hosts) + "\n")
        mem_mb = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2**20
        node_lines = "\n".join(
            f"NodeName={name} NodeAddr={node['addr']} CPUs={CPUS_PER_NODE} "
            f"RealMemory={max(1, mem_mb // 2)} State=UNKNOWN"  # below the real amount, else
            for name, node in network.nodes.items()  # slurmd drains the node
        )
        (state_dir / "slurm.conf").write_text(
            SLURM_CONF.format(
                ctld_host=ctld_host,
                ctld_addr=network.ctld_addr,
                state=state_dir,
                munge_socket=munge_dir / "munge.socket",
                ctld_port=_free_port(16817),
                slurmd_port=_free_port(16818),
                node_lines=node_lines,
                min_job_age=min_job_age,
            )
        )
        for name in network.nodes:
            (state_dir / "spool" / name).mkdir(exist_ok=True)
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
        }
        for name in network.nodes:
            cmds[f"slurmd@{name}"] = _slurmd_command(state_dir, network, name, sbin["slurmd"])
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
        pids = {n: p.pid for n, p in zip(cmds, procs, strict=True)}
        cluster = cls(state_dir, list(network.nodes), pids, procs)
        (state_dir / "pids").write_text("".join(f"{n} {p}\n" for n, p in cluster.pids.items()))
        (state_dir / "env.sh").write_text(f"export SLURM_CONF={cluster.conf_path}\n")
        (state_dir / "slurmd_path").write_text(sbin["slurmd"])
        if not _wait_for(cluster._all_idle, timeout, abort=lambda: bool(cluster._dead())):
            dead = cluster._dead()
            logs = "\n".join(
                f"--- {n}.log ---\n{_tail(state_dir / 'log' / f'{n}.log')}" for n in cmds
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
        name of a process that is starting up (ip, unshare, sh, then slurmd) differs from
        its final one."""

        def exited(name: str, pid: int) -> bool:
            if pid in self._procs:
                return self._procs[pid].poll() is not None
            return not _pid_is(pid, name.split("@")[0])

        return [n for n, pid in self.pids.items() if exited(n, pid)]

    def _run(self, *cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=15)

    def node_states(self) -> dict[str, str]:
        res = self._run("sinfo", "-h", "-N", "-o", "%N %T")
        return dict(line.split() for line in res.stdout.splitlines() if line.strip())

    def _all_idle(self) -> bool:
        states = self.node_states()
        return all(states.get(n) == "idle" for n in self.nodes)

    def kill_node(self, name: str) -> None:
        """Take ``name`` away as a power loss would: its link goes down (nothing more gets
        in or out) and every process in its namespace (slurmd, slurmstepd, the job's ranks)
        is SIGKILLed. Slurm notices only by its silence (SlurmdTimeout)."""
        node = self.network.nodes[name]
        _sh("ip", "link", "set", node["veth"], "down")
        for pid in self.network.pids(name):
            _kill(pid, signal.SIGKILL)

    def revive_node(self, name: str, timeout: float = 60) -> None:
        """Bring ``name`` back: link up, a fresh slurmd; Slurm returns it to service when it
        registers (ReturnToService=2)."""
        _sh("ip", "link", "set", self.network.nodes[name]["veth"], "up")
        slurmd = (self.state_dir / "slurmd_path").read_text().strip()
        env = dict(os.environ, SLURM_CONF=str(self.conf_path))
        with open(self.state_dir / "log" / f"slurmd@{name}.log", "ab") as log:
            # Its own session: it is stopped with the node's namespace, not with this process.
            subprocess.Popen(_slurmd_command(self.state_dir, self.network, name, slurmd),
                             env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                             start_new_session=True)  # fmt: skip
        if not _wait_for(lambda: self.node_states().get(name) == "idle", timeout):
            raise RuntimeError(f"{name} did not come back: {self.node_states()}")

    def stop(self, timeout: float = 15) -> None:
        """Cancel leftover jobs (their slurmstepds outlive slurmd), then end our daemons and
        remove the nodes' namespaces."""
        if not self.pids:
            return
        if "slurmctld" not in self._dead():
            self._run("scancel", "--partition=debug")
            self._run("scancel", "--partition=urgent")
            _wait_for(lambda: not self._run("squeue", "-h", "-t", "R,CG").stdout.strip(), 10)
        # Reverse start order: slurmd/slurmctld may still talk to munged while shutting down.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for name, pid in reversed(self.pids.items()):
                if _pid_is(pid, name.split("@")[0]):
                    os.kill(pid, sig)
            if _wait_for(lambda: len(self._dead()) == len(self.pids), timeout):
                break
        for proc in self._procs.values():
            proc.wait()  # reap our children so they don't linger as zombies
        self.network.delete()  # and with it any slurmd revived by a test
        self.pids = {}
        munge_dir = self.state_dir / "munge_dir"
        if munge_dir.exists():
            shutil.rmtree(munge_dir.read_text().strip(), ignore_errors=True)
            munge_dir.unlink()


def _slurmd_command(state_dir: Path, network: Network, name: str, slurmd: str) -> list[str]:
    """slurmd for node ``name``, in its network namespace, with its own hostname and hosts
    file (a new UTS and mount namespace); ``exec`` keeps slurmd's PID the one started."""
    script = (f"hostname {name} && mount --bind {state_dir / 'hosts'} /etc/hosts && "
              f"exec {slurmd} -D -N {name}")  # fmt: skip
    # nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup tree slurmd reads.
    netns = f"--net=/run/netns/{network.nodes[name]['netns']}"
    return ["nsenter", netns, "unshare", "--uts", "--mount", "--propagation", "private", "--",
            "/bin/sh", "-c", script]  # fmt: skip


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
    return SlurmCluster(conf.parent, _conf_nodes(conf), pids={})


def _conf_nodes(conf: Path) -> list[str]:
    return [line.split()[0].split("=", 1)[1] for line in conf.read_text().splitlines()
            if line.startswith("NodeName=")]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in ("start", "stop"):
        print(f"usage: {sys.argv[0]} start|stop STATE_DIR", file=sys.stderr)
        return 2
    state_dir = Path(args[1]).resolve()
    if args[0] == "start":
        if reason := ensure_slurm_installed():
            print(f"cannot start the test Slurm: {reason}", file=sys.stderr)
            return 1
        cluster = SlurmCluster.start(state_dir, detach=True)
        print(f"Slurm nodes {', '.join(cluster.nodes)} idle; source {state_dir / 'env.sh'}")
        return 0
    pids = dict(line.split() for line in (state_dir / "pids").read_text().splitlines())
    nodes = _conf_nodes(state_dir / "slurm.conf")
    SlurmCluster(state_dir, nodes, {n: int(p) for n, p in pids.items()}).stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
