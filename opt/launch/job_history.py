"""What the allocation driver reads back from the run's logbook, so that its limits and
exclusions survive requeues: requeues by cause, failures by host, the hosts to exclude,
and an allocation that ended without the driver's word."""

from __future__ import annotations

from collections import Counter

from opt.config import JobConfig
from opt.launch.slurm_env import expand_hostlist
from opt.run.logbook.events import (
    AllocationEnd,
    AllocationStart,
    Event,
    GaveUp,
    NodeExcluded,
    Requeue,
)

# Failures of a host: they count toward its exclusion, and share one requeue limit.
FAILURE_CAUSES = ("process_failure", "node_failure", "hang")


def requeue_counts(events: list[Event]) -> Counter:
    """Requeues so far, by cause."""
    return Counter(e.cause for e in events if isinstance(e, Requeue))


def requeue_limit(cfg: JobConfig, cause: str) -> int | None:
    """How many requeues ``cause`` may use (failures of both kinds share one limit); None
    for preemptions, which requeue without limit."""
    limits = {
        "timeout": cfg.slurm.max_timeout_requeues,
        "process_failure": cfg.slurm.max_failure_requeues,
        "node_failure": cfg.slurm.max_failure_requeues,
        "hang": cfg.slurm.max_failure_requeues,
        "straggler": cfg.slurm.max_failure_requeues,
    }
    return limits.get(cause)


def requeues_used(events: list[Event], cause: str) -> int:
    """The requeues counted against ``cause``'s limit (failures and stragglers share one)."""
    counts = requeue_counts(events)
    shared = (*FAILURE_CAUSES, "straggler")
    return sum(counts[c] for c in shared) if cause in shared else counts[cause]


def failures_by_host(events: list[Event]) -> Counter:
    return Counter(
        host
        for e in events
        if isinstance(e, Requeue) and e.cause in FAILURE_CAUSES
        for host in e.hosts
    )


def excluded_hosts(cfg: JobConfig, events: list[Event]) -> list[str]:
    """Hosts to keep out of later allocations: the config's plus repeat offenders."""
    hosts = expand_hostlist(cfg.slurm.exclude) if cfg.slurm.exclude else []
    for e in events:  # a straggler's host is left out at once
        if isinstance(e, Requeue) and e.cause == "straggler":
            hosts += [h for h in e.hosts if h not in hosts]
    if cfg.slurm.exclude_after_failures:
        for host, count in failures_by_host(events).items():
            if count >= cfg.slurm.exclude_after_failures and host not in hosts:
                hosts.append(host)
    return hosts


def newly_excluded(cfg: JobConfig, events: list[Event]) -> list[str]:
    """Hosts that have just reached the failure threshold, or been found straggling (not
    excluded before)."""
    already = {h for e in events if isinstance(e, NodeExcluded) for h in e.hosts}
    blamed = set(failures_by_host(events)) | {
        h for e in events if isinstance(e, Requeue) and e.cause == "straggler" for h in e.hosts
    }
    return [h for h in excluded_hosts(cfg, events) if h not in already and h in blamed]


def last_allocation(events: list[Event]) -> AllocationStart | None:
    return next((e for e in reversed(events) if isinstance(e, AllocationStart)), None)


def allocation_vanished(events: list[Event]) -> bool:
    """The last allocation started and nothing ended it (no requeue, end or give-up)."""
    for event in reversed(events):
        if isinstance(event, (Requeue, AllocationEnd, GaveUp)):
            return False
        if isinstance(event, AllocationStart):
            return True
    return False
