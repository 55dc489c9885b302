"""The allocation driver: what each allocation of an `opt launch slurm` job runs.

It runs in the batch step (on the first node), starts the training tasks with srun, and
when they end decides what happens to the job:

- the run finished, or the supervisor stopped it for a human: the job ends;
- the ranks stopped on Slurm's warning signal and saved a checkpoint: requeue (a timeout
  when Slurm's end time for the job is near, up to ``slurm.max_timeout_requeues``; a
  preemption when Slurm dated one, or the signal was not the time limit's, without limit);
- a rank or node failed (srun's --kill-on-bad-exit ended the others), or a rank hung
  (its peers' watchdog ended the step; opt/launch/hang_watch.py): requeue up to
  ``slurm.max_failure_requeues``, excluding a node that failed
  ``slurm.exclude_after_failures`` times;
- the ranks stopped for a straggler (a node's ranks persistently slow, saved): requeue
  without that node, within the same limit;
- a node died and Slurm requeued the job itself: the next allocation names the node from
  what Slurm reports of it, and counts it as that node's failure;
- training refused to start (exit status 2: a config, data or checkpoint error that no
  retry can fix): the job ends.

The next allocation resumes from the newest checkpoint that verifies against its manifest
(the trainer checks). Every decision is an event in the run's public logbook; the counts
that the limits apply to are read back from it, so they survive requeues.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from opt.config import JobConfig, load_config
from opt.errors import REFUSED_EXIT
from opt.launch.hang_watch import Hang, HangWatch
from opt.launch.job_history import (
    allocation_vanished,
    excluded_hosts,
    failures_by_host,
    last_allocation,
    newly_excluded,
    requeue_limit,
    requeues_used,
)
from opt.launch.slurm_env import expand_hostlist, master_port
from opt.launch.slurm_job import srun_command, tasks_per_node
from opt.run import status as run_status
from opt.run.logbook import Logbook
from opt.run.logbook.events import (
    AllocationEnd,
    AllocationStart,
    Event,
    GaveUp,
    NodeExcluded,
    Requeue,
)
from opt.run.preemption import ENV as STOP_SIGNALS_ENV

# srun's report of a failed task, e.g. "srun: error: node7: task 3: Killed".
SRUN_TASK_ERROR = re.compile(r"srun: error: ([^:\s]+): tasks? ([\d,\-]+): (.+)")
SRUN_NODE_FAILURE = re.compile(r"srun: error: Node failure on (\S+)")


@dataclass
class AllocationDriver:
    """The callable submitit pickles and runs in every allocation of the job."""

    config_file: str

    def __call__(self) -> int:
        code = run_allocation(load_config(self.config_file), self.config_file)
        if code:
            sys.exit(code)  # a failed job in Slurm's view when the run did not finish
        return code


@dataclass
class StepOutcome:
    exit_code: int
    failures: list[tuple[str, str, str]]  # (host, tasks, srun's reason), in report order
    node_failures: list[str]
    last_lines: list[str]
    hang: Hang | None = None  # the ranks' watchdog caught one; the stacks are on disk

    @property
    def refused(self) -> bool:
        """The first task to end exited with `opt train`'s status for bad input (srun's
        own status is then 143: it terminated the rest)."""
        if self.failures:
            return self.failures[0][2] == f"Exited with exit code {REFUSED_EXIT}"
        return self.exit_code == REFUSED_EXIT


def run_allocation(cfg: JobConfig, config_file: str) -> int:
    # The ranks handle the warning signal; the driver must survive it (a `scancel
    # --full --signal`, say). A plain scancel (TERM) ends the driver, so nothing requeues.
    for name in ("SIGUSR1", "SIGUSR2"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    job_id = os.environ.get("SLURM_JOB_ID", "?")
    hosts = expand_hostlist(os.environ.get("SLURM_JOB_NODELIST", socket.gethostname()))
    book = Logbook(cfg.logbook.dir, cfg.run.name)
    history = _events(book)
    if allocation_vanished(history):
        # The previous allocation ended without the driver's word, and Slurm requeued the
        # job itself: a preemption (the ranks had saved on the signal) or a node that died
        # (Slurm failed the job when the node stopped answering). The hosts to blame are
        # those of the previous allocation that Slurm now reports down or not responding.
        requeue = _requeue_by_slurm(cfg, history, job_id)
        if (code := _give_up_if_over_limit(cfg, book, history, requeue)) is not None:
            return code
        book.append(requeue)
        _new_exclusions(cfg, book, job_id, running=True)
        history = _events(book)
    excluded = excluded_hosts(cfg, history)
    if unwanted := sorted(set(excluded) & set(hosts)):
        # Slurm gave this allocation a host excluded after this job's exclusions were last
        # set (they change only while the job is pending): requeue without it, untrained.
        print(f"driver: allocation includes excluded host(s) {', '.join(unwanted)}", flush=True)
        book.append(Requeue(cause="excluded_host", job_id=job_id, requeued_by="opt",
                            hosts=unwanted, allocation_hosts=hosts))  # fmt: skip
        return _requeue(job_id, excluded)
    book.append(
        AllocationStart(
            job_id=job_id,
            restart=int(os.environ.get("SLURM_RESTART_COUNT", "0")),
            hosts=hosts,
            ranks=int(os.environ.get("SLURM_NTASKS", "0")) or None,
        )
    )
    started, started_at = time.monotonic(), time.time()
    outcome = run_training_step(cfg, config_file, hosts, job_id)
    status = run_status.read_status(cfg.run_dir)
    # A state written before this allocation (a crash before training began) says nothing
    # about how this one ended; its step is still the last one known.
    state = status.get("state") if status.get("updated", 0) >= started_at else None
    step = status.get("step")
    if outcome.exit_code == 0 and state == run_status.FINISHED:
        book.append(AllocationEnd(job_id=job_id, step=step, result="finished"))
        return 0
    if state == run_status.STOPPED_FOR_HUMAN:
        book.append(AllocationEnd(job_id=job_id, step=step, result="stopped for a human"))
        return 3
    if outcome.refused and state != run_status.RUNNING:
        detail = next((ln for ln in outcome.last_lines if ": error: " in ln and "srun" not in ln),
                      f"exit status {REFUSED_EXIT}")  # fmt: skip
        book.append(GaveUp(job_id=job_id, step=step, cause="refused", detail=detail))
        return REFUSED_EXIT
    if outcome.exit_code == 0 and state == run_status.STOPPED_ON_SIGNAL:
        cause, judged_on = stop_cause(cfg, job_id, time.monotonic() - started)
        requeue = _requeue_event(cause, job_id, status, detail=judged_on)
        if (code := _give_up_if_over_limit(cfg, book, history, requeue)) is not None:
            return code
        book.append(requeue)
        return _requeue(job_id, excluded or None)
    if outcome.hang is not None:
        return _requeue_after_hang(cfg, book, history, outcome.hang, job_id, status)
    if outcome.exit_code == 0 and state == run_status.STOPPED_STRAGGLER:
        # The ranks agreed that a node's ranks are persistently slow and saved: requeue
        # without it (at once, whatever exclude_after_failures says).
        requeue = _requeue_event(
            "straggler", job_id, status, hosts=status.get("hosts", []),
            ranks=",".join(map(str, status.get("ranks", []))), detail=status.get("reason"),
        )  # fmt: skip
        return _requeue_with_exclusions(cfg, book, history, requeue)
    first = outcome.failures[0] if outcome.failures else None
    requeue = _requeue_event(
        "node_failure" if outcome.node_failures else "process_failure",
        job_id,
        status,
        hosts=outcome.node_failures or [h for h, _, _ in outcome.failures[:1]],
        ranks=first[1] if first else None,
        detail=first[2] if first else f"srun exit status {outcome.exit_code}",
    )
    return _requeue_with_exclusions(cfg, book, history, requeue)


# Slurm sends --signal up to 60 s before it is due (its timer's resolution), and our ranks
# take a step or two to agree on stopping: a signal that came this close to the job's end
# time, on top of signal_delay_s, came from the time limit.
SIGNAL_EARLY_S = 90


def stop_cause(cfg: JobConfig, job_id: str, elapsed_s: float) -> tuple[str, str]:
    """Why the ranks got the warning signal, from what Slurm reports of the job: a
    preemption if Slurm set its PreemptTime; a timeout if its EndTime (start + time limit)
    was at most signal_delay_s (+ SIGNAL_EARLY_S) away; otherwise a signal that was not the
    time limit's (an operator's `scancel --signal`, a preemption Slurm did not date), which
    requeues as a preemption. Returns (cause, what it was judged on). Without scontrol's
    answer, the elapsed time against the configured limit judges, and says so."""
    job = scontrol_job(job_id)
    preempted = job.get("PreemptTime", "None")
    if preempted not in ("None", "Unknown", ""):
        return "preemption", f"Slurm set PreemptTime={preempted}"
    end = _slurm_time(job.get("EndTime", ""))
    if end is not None:
        left = end - time.time()
        cause = "timeout" if left <= cfg.slurm.signal_delay_s + SIGNAL_EARLY_S else "preemption"
        return cause, f"Slurm's EndTime={job['EndTime']}: {left:.0f} s away at the stop"
    near_limit = elapsed_s >= cfg.slurm.time_minutes * 60 - cfg.slurm.signal_delay_s - 120
    return ("timeout" if near_limit else "preemption",
            f"no answer from scontrol: {elapsed_s:.0f} s into the allocation")  # fmt: skip


def scontrol_job(job_id: str) -> dict[str, str]:
    """`scontrol show job -o JOB_ID` as {field: value}; empty where scontrol fails."""
    records = _scontrol_show("job", job_id)
    return records[0][0] if records else {}


def _scontrol_show(kind: str, names: str) -> list[tuple[dict[str, str], str]]:
    """`scontrol show KIND -o NAMES`: each record as ({field: value}, its line); empty where
    scontrol fails. (A value with spaces, such as a node's Reason, is read from the line.)"""
    try:
        result = subprocess.run(["scontrol", "show", kind, "-o", names], capture_output=True,
                                text=True, timeout=30, check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return []
    if result.returncode != 0:
        return []
    return [(dict(re.findall(r"(\w+)=(\S*)", line)), line)
            for line in result.stdout.splitlines() if line.strip()]  # fmt: skip


def _slurm_time(value: str) -> float | None:
    """A Slurm timestamp (local time, 2026-11-30T07:45:00) as epoch seconds."""
    try:
        return time.mktime(time.strptime(value, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


def run_training_step(cfg: JobConfig, config_file: str, hosts: list[str], job_id: str):
    """srun the training tasks; pass their output through and keep srun's failure reports,
    watching for a hang the ranks' watchdog reports meanwhile."""
    env = dict(os.environ)
    env[STOP_SIGNALS_ENV] = f"{cfg.slurm.signal},TERM"
    env["MASTER_ADDR"] = hosts[0]
    env["MASTER_PORT"] = str(master_port(job_id))
    nodes = int(os.environ.get("SLURM_JOB_NUM_NODES", "0")) or None
    command = srun_command(cfg, config_file, nodes=nodes)
    print("driver: " + " ".join(command), flush=True)
    world = (nodes or cfg.slurm.nodes) * tasks_per_node(cfg)
    watch = HangWatch(cfg.run_dir, job_id, hosts, tasks_per_node(cfg), world)
    with watch:
        proc = subprocess.Popen(
            command, env=env, stdout=sys.stdout, stderr=subprocess.PIPE, text=True, bufsize=1
        )
        failures, node_failures, last_lines = [], [], []
        for line in proc.stderr:
            sys.stderr.write(line)
            last_lines = [*last_lines[-49:], line.rstrip()]
            if match := SRUN_NODE_FAILURE.search(line):
                node_failures.append(match.group(1))
            elif match := SRUN_TASK_ERROR.search(line):
                failures.append(match.groups())
        sys.stderr.flush()
        code = proc.wait()
    return StepOutcome(code, failures, node_failures, last_lines, watch.hang)


def _events(book: Logbook) -> list[Event]:
    return book.events() if book.events_path.is_file() else []


def _give_up_if_over_limit(
    cfg: JobConfig, book: Logbook, history: list[Event], requeue: Requeue
) -> int | None:
    """Give up instead of ``requeue`` (and return the exit status) when its cause has used
    up its requeues. A failure's give-up says where it happened, as its requeue would have."""
    limit = requeue_limit(cfg, requeue.cause)
    if limit is None:
        return None  # preemptions requeue without limit
    used = requeues_used(history, requeue.cause)
    if used < limit:
        return None
    where = {} if requeue.cause == "timeout" else {
        "tokens": requeue.tokens, "hosts": requeue.hosts, "ranks": requeue.ranks,
        "detail": requeue.detail, "checkpoint": requeue.checkpoint,
        "allocation_hosts": requeue.allocation_hosts,
    }  # fmt: skip
    book.append(GaveUp(job_id=requeue.job_id, step=requeue.step, cause=requeue.cause,
                       requeues_used=used, limit=limit, **where))  # fmt: skip
    return 1


def _requeue_event(cause: str, job_id: str, status: dict, **where) -> Requeue:
    """A requeue the driver decides, where the run stood (status.json): step, tokens and the
    last checkpoint; ``where`` says what happened (hosts, ranks, detail)."""
    return Requeue(cause=cause, job_id=job_id, step=status.get("step"),
                   tokens=status.get("tokens"), checkpoint=status.get("last_checkpoint"),
                   requeued_by="opt", **where)  # fmt: skip


def _requeue_after_hang(
    cfg: JobConfig, book: Logbook, history: list[Event], hang: Hang, job_id: str, status: dict
) -> int:
    """Requeue after the watchdog caught a hang: a failure of the hung ranks' hosts (counted
    toward their exclusion), with where every rank's stack is."""
    stuck = (f"rank(s) {', '.join(map(str, hang.hung))} made no progress after step "
             f"{hang.after_step} and wrote no stack of their own (taken by py-spy)"
             if hang.hung else f"no rank progressed after step {hang.after_step}; every rank "
             "wrote its stack, none can be blamed")  # fmt: skip
    requeue = _requeue_event(
        "hang",
        job_id,
        status,
        hosts=hang.hosts,
        ranks=",".join(map(str, hang.hung)) or None,
        detail=f"{stuck}; stacks in {hang.directory}",
    )
    return _requeue_with_exclusions(cfg, book, history, requeue)


def _requeue_with_exclusions(
    cfg: JobConfig, book: Logbook, history: list[Event], requeue: Requeue
) -> int:
    """Give up if ``requeue``'s cause is out of requeues; else log it, exclude the hosts it
    has just made repeat offenders (or stragglers), and requeue without every excluded one."""
    if (code := _give_up_if_over_limit(cfg, book, history, requeue)) is not None:
        return code
    book.append(requeue)
    _new_exclusions(cfg, book, requeue.job_id)
    return _requeue(requeue.job_id, excluded_hosts(cfg, book.events()) or None)


def _new_exclusions(cfg: JobConfig, book: Logbook, job_id: str, running: bool = False) -> None:
    """Log the hosts that have just reached the failure threshold (or been found straggling).
    When the driver requeues next, the job's exclusions are set to every excluded host; while
    this allocation is ``running``, they cannot be set yet."""
    events = book.events()
    new = newly_excluded(cfg, events)
    if not new:
        return
    hosts = excluded_hosts(cfg, events)
    failures = failures_by_host(events)
    book.append(NodeExcluded(
        job_id=job_id, hosts=new, exclude=",".join(hosts),
        failures={h: failures[h] for h in new}, applied=not running,
        detail="set at this job's next requeue: Slurm changes a job's excluded nodes only "
               "while it is pending" if running else None,
    ))  # fmt: skip


def _requeue_by_slurm(cfg: JobConfig, history: list[Event], job_id: str) -> Requeue:
    """The requeue Slurm did itself, judged from what was left: a checkpoint saved on the
    warning signal (a preemption), else a failure of the previous allocation's hosts that
    Slurm now reports down or not responding (a dead node)."""
    saved = run_status.read_status(cfg.run_dir).get("state") == run_status.STOPPED_ON_SIGNAL
    previous = last_allocation(history)
    allocation = previous.hosts if previous else []
    if saved:
        return Requeue(cause="preemption", job_id=job_id, requeued_by="slurm",
                       allocation_hosts=allocation,
                       detail="the previous allocation ended without the driver's report, "
                              "after the ranks saved on the warning signal")  # fmt: skip
    down = unresponsive_nodes(allocation)
    detail = "; ".join(f"{host}: {why}" for host, why in down.items()) or (
        "the previous allocation ended without the driver's report; Slurm reports none of "
        "its nodes down"
    )
    return Requeue(cause="node_failure", job_id=job_id, requeued_by="slurm",
                   hosts=list(down), allocation_hosts=allocation, detail=detail)  # fmt: skip


def unresponsive_nodes(hosts: list[str]) -> dict[str, str]:
    """Of ``hosts``, those Slurm reports down, failing or not responding (a ``*`` on the
    state), with its state and reason, e.g. {"node2": "DOWN* (Not responding,
    since 2026-11-30T09:01:12)"}."""
    if not hosts:
        return {}
    down = {}
    for node, line in _scontrol_show("node", ",".join(hosts)):
        state = node.get("State", "")
        if "*" in state or any(s in state for s in ("DOWN", "FAIL", "NOT_RESPONDING")):
            reason = re.search(r"Reason=(.*?) \[[^\]]*@([^\]]+)\]", line)
            why = f" ({reason.group(1)}, since {reason.group(2)})" if reason else ""
            down[node.get("NodeName", "?")] = f"{state}{why}"
    return down


def _scontrol(*args: str) -> bool:
    result = subprocess.run(["scontrol", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        print(f"error: scontrol {' '.join(args)}: {result.stderr.strip()}", file=sys.stderr)
    return result.returncode == 0


def _requeue(job_id: str, exclude: list[str] | None = None) -> int:
    """Requeue this job (same id, same run directory). Slurm answers a requeue by sending
    the batch step TERM; a running job's node exclusions cannot be changed, so to change
    them the job is requeued held, updated, and released, with TERM ignored meanwhile."""
    if exclude is None:
        ok = _scontrol("requeue", job_id)
    else:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        ok = _scontrol("requeuehold", job_id)
        ok = ok and _scontrol("update", f"JobId={job_id}", f"ExcNodeList={','.join(exclude)}")
        ok = _scontrol("release", job_id) and ok
    if not ok:
        return 1
    print(f"driver: requeued job {job_id}", flush=True)
    return 0
