"""torch.profiler over training steps: the top ops and a GEMM / attention / optimizer / ...
breakdown of self CPU time. Used by train_throughput.py for both sides of the comparison."""

from __future__ import annotations

import time
from collections.abc import Callable

# An op's self CPU time goes to the first category matching its own name or, failing that,
# to the nearest enclosing op or autograd node that matches (e.g. the fill_ and add run by
# EmbeddingBackward0 count as embedding, the mul_ of _foreach_mul_ as optimizer+clip).
CATEGORIES = (
    ("GEMM", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul")),
    ("loss", ("log_softmax", "nll_loss", "cross_entropy", "chunkedlinearcrossentropy")),
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention")),
    ("embedding", ("embedding",)),
    ("optimizer+clip", ("adamw", "optimizer.", "_foreach", "vector_norm")),
    ("dropout", ("dropout", "bernoulli")),
    ("layernorm", ("layer_norm",)),
    ("casts/copies", ("aten::_to_copy", "aten::copy_", "aten::clone", "aten::contiguous")),
)


def _match(name: str) -> str | None:
    lowered = name.lower()
    for category, patterns in CATEGORIES:
        if any(p in lowered for p in patterns):
            return category
    return None


def _category(event) -> str:
    node = event
    while node is not None:
        category = _match(node.name)
        if category is not None:
            return category
        node = node.cpu_parent
    return "other"


def _top_ops(events: list, steps: int, limit: int = 15) -> str:
    """key_averages()-style table of the ops with the most self CPU time, per step."""
    self_us: dict[str, float] = {}
    total_us: dict[str, float] = {}
    calls: dict[str, int] = {}
    for event in events:
        self_us[event.name] = self_us.get(event.name, 0.0) + event.self_cpu_time_total
        total_us[event.name] = total_us.get(event.name, 0.0) + event.cpu_time_total
        calls[event.name] = calls.get(event.name, 0) + 1
    everything = sum(self_us.values())
    lines = [
        f"{'op':<64} {'self ms/step':>12} {'self %':>7} {'total ms/step':>13} {'calls/step':>10}"
    ]
    for name in sorted(self_us, key=self_us.get, reverse=True)[:limit]:
        lines.append(
            f"{name[:64]:<64} {self_us[name] / 1e3 / steps:12.1f} "
            f"{self_us[name] / everything:7.1%} {total_us[name] / 1e3 / steps:13.1f} "
            f"{calls[name] / steps:10.0f}"
        )
    return "\n".join(lines)


def profile_steps(step: Callable[[], object], steps: int, label: str) -> str:
    """Profile ``steps`` calls of ``step`` (one profiler each); returns the report text."""
    from torch.profiler import ProfilerActivity, profile

    events: list = []
    wall = 0.0
    for _ in range(steps):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            step()
            wall += (time.perf_counter() - start) / steps
        events.extend(prof.events())
    by_category: dict[str, float] = {}
    for event in events:
        category = _category(event)
        by_category[category] = by_category.get(category, 0.0) + event.self_cpu_time_total
    ops = sum(by_category.values()) / 1e6 / steps
    lines = [f"=== profile: {label}, {steps} steps (self CPU time) ===", _top_ops(events, steps)]
    lines.append(f"{label}: {wall:.3f} s/step wall (profiled), {ops:.3f} s in ops")
    for category, us in sorted(by_category.items(), key=lambda kv: -kv[1]):
        seconds = us / 1e6 / steps
        lines.append(f"  {category:<15} {seconds:7.3f} s/step  {seconds / wall:6.1%}")
    untracked = wall - ops
    lines.append(f"  {'not in ops':<15} {untracked:7.3f} s/step  {untracked / wall:6.1%}")
    return "\n".join(lines)
