"""What a checkpoint costs: the stall an async save adds to training, and save/load bandwidth.

    python bench/checkpoint_cost.py                        # opt-125m shape cut to 4 layers, seq 512
    python bench/checkpoint_cost.py --quick                # smoke run: 1 layer, seq 128, 2 repetitions
    python bench/checkpoint_cost.py --write BENCHMARKS.md

1. Stall. The real trainer steps as ``Trainer.fit`` does (``train_step``, then
   ``checkpoints.poll()``, then ``checkpoints.save(step)`` on a save step, with
   ``checkpoint.async_save`` on as by default). A save step is timed together with every
   following step until the background save is committed (at least one), so staging, the
   commit and background writing that slows the next steps all count. Stall = that window's
   time - its number of steps x the median plain step; reported against one plain step.
2. Bandwidth. ``checkpoints.save(step, sync=True)`` and ``load_training_state`` (checksums
   verified, as a resume does) in MB/s of checkpoint files, against ``dd`` on the same
   filesystem writing and reading as many bytes. Our commit fsyncs every file, so dd writes
   with ``conv=fdatasync``. Reads are timed like for like, twice: warm, both sides reading
   files they have just written from the page cache; cold, both sides' files evicted from
   the page cache first (fsync + ``POSIX_FADV_DONTNEED`` on every file, checked with
   mincore(2)), so both read the disk. dd with ``iflag=direct`` is a cross-check of the
   disk's read speed. Ours and dd alternate within each repetition, so load from other
   processes hits both.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from opt.checkpoint import latest_checkpoint, load_training_state, manifest, verify_checkpoint
from opt.config import load_config
from opt.data.prepare import ensure_builtin_dataset
from opt.models.sizes import get_model_args
from opt.train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from report import command_line, machine_info, write_section

TITLE = "## Checkpoint cost: async-save stall and save/load bandwidth vs dd (CPU)"
QUICK = {"layers": 1, "seq_len": 128, "reps": 2, "plain": 2, "warmup": 1}
DEFAULTS = {"layers": 4, "seq_len": 512, "reps": 5, "plain": 3, "warmup": 2}
MIN_REPS = 5
MB = 1e6  # dd's unit
DD_BLOCK = 4 << 20
STALL_TARGET = 0.05
BANDWIDTH_TARGET = 0.5


def config_overrides(args: argparse.Namespace, data: Path, tmp: Path) -> list[str]:
    """A run config: grad_accum 1, async saves (the default), one checkpoint kept."""
    overrides = {
        "run.name": "bench-checkpoint",
        "run.dir": str(tmp / "runs"),
        "run.seed": 0,
        "model.name": args.model,
        "model.n_layers": args.layers,
        "data.path": str(data),
        "data.seq_len": args.seq_len,
        "train.micro_batch_size": 1,
        "train.batch_tokens": args.seq_len,
        "train.device": "cpu",
        "checkpoint.dir": str(tmp / "checkpoints"),
        "checkpoint.keep_last": 1,  # every measured commit prunes the previous checkpoint
        "checkpoint.resume": "none",
        "logbook.dir": str(tmp / "logbook"),
        "metrics.tensorboard": False,
        "metrics.peak_tflops": 1.0,
    }
    return [f"--{k}={json.dumps(v)}" for k, v in overrides.items()]


# ----- 1. the stall of an async save ---------------------------------------------------------
@dataclass
class Window:
    """One async save: the save step and the steps until its commit."""

    step_times: list[float]  # each: train_step + checkpoints.poll() (+ save)
    save_call: float  # checkpoints.save() alone: small files; the copy and writes start
    staging_wait: float  # optimizer steps waiting for the background copy of the tensors
    commit: float  # the poll/finish call that committed: fsync, hash, manifest, prune
    waited: bool  # committed by a blocking finish after max_follow steps

    @property
    def blocked(self) -> float:
        """What the loop itself waited for: the save call, the copy, and the commit."""
        return self.save_call + self.staging_wait + self.commit

    def stall(self, plain_step: float) -> float:
        return sum(self.step_times) - len(self.step_times) * plain_step


@dataclass
class Stall:
    plain: list[float] = field(default_factory=list)
    windows: list[Window] = field(default_factory=list)
    checkpoint_bytes: int = 0
    verified: str = ""

    @property
    def plain_step(self) -> float:
        return statistics.median(self.plain)

    def stalls(self) -> list[float]:
        return [w.stall(self.plain_step) for w in self.windows]


def fit_step(trainer: Trainer, save: bool) -> tuple[float, float, float]:
    """One iteration of Trainer.fit's loop: (total, save call, poll call) seconds."""
    start = time.perf_counter()
    trainer.train_step()
    finish_start = time.perf_counter()
    trainer.checkpoints.poll()
    save_start = time.perf_counter()
    if save:
        trainer.checkpoints.save(trainer.step)
    end = time.perf_counter()
    return end - start, end - save_start, save_start - finish_start


def measure_stall(trainer: Trainer, args: argparse.Namespace) -> Stall:
    result = Stall()
    # Unmeasured: warmup steps and one full async save cycle (DCP's first save sets up its
    # writer thread and planner caches; from the second one on, each commit prunes one).
    for _ in range(args.warmup):
        fit_step(trainer, save=False)
    fit_step(trainer, save=True)
    trainer.checkpoints.finish()
    for rep in range(args.reps):
        for _ in range(args.plain):
            result.plain.append(fit_step(trainer, save=False)[0])
        staging_before = trainer.checkpoints.staging_wait_s
        total, save_call, _ = fit_step(trainer, save=True)
        times, commit, waited = [total], 0.0, False
        while trainer.checkpoints.in_flight or len(times) < 2:
            if len(times) > args.max_follow:
                start = time.perf_counter()
                trainer.checkpoints.finish()
                commit = time.perf_counter() - start
                times[-1] += commit
                waited = True
                break
            pending = trainer.checkpoints.in_flight
            total, _, finish = fit_step(trainer, save=False)
            times.append(total)
            if pending and not trainer.checkpoints.in_flight:
                commit = finish
        staging_wait = trainer.checkpoints.staging_wait_s - staging_before
        window = Window(times, save_call, staging_wait, commit, waited)
        result.windows.append(window)
        print(
            f"[stall] save {rep + 1}: {len(times)} steps {sum(times):.3f} s (save call "
            f"{save_call:.3f} s, staging wait {staging_wait:.3f} s, commit {commit:.3f} s); "
            "plain step so far "
            f"{result.plain_step:.3f} s -> stall {window.stall(result.plain_step):.3f} s",
            flush=True,
        )
    trainer.checkpoints.finish()
    path = latest_checkpoint(trainer.cfg.checkpoint_dir)
    if path is None:
        raise SystemExit("no complete checkpoint after checkpoints.finish()")
    manifest = verify_checkpoint(path)  # every file present, sizes and SHA-256 as committed
    if manifest["step"] != trainer.checkpoints.last_saved_step:
        raise SystemExit(
            f"{path} is step {manifest['step']}, expected {trainer.checkpoints.last_saved_step}"
        )
    result.checkpoint_bytes = dir_bytes(path)
    result.verified = f"{path.name}: {len(manifest['files'])} files, checksums verified"
    print(f"[stall] {result.verified}", flush=True)
    return result


# ----- 2. save and load bandwidth against dd -------------------------------------------------
@dataclass
class Bandwidth:
    bytes: int = 0
    save: list[float] = field(default_factory=list)
    dd_write: list[float] = field(default_factory=list)
    # Reads: "warm" from the page cache (the files were just written), "cold" from the disk
    # (every file evicted from the page cache first), ours and dd's alike.
    load_warm: list[float] = field(default_factory=list)
    dd_read_warm: list[float] = field(default_factory=list)
    load_cold: list[float] = field(default_factory=list)
    dd_read_cold: list[float] = field(default_factory=list)
    verify_cold: list[float] = field(default_factory=list)  # the checksum pass alone
    verify_warm: list[float] = field(default_factory=list)
    dd_read_direct: list[float] = field(default_factory=list)  # O_DIRECT: a cross-check
    # The share of the files' bytes in the page cache just before each read, per kind.
    resident: dict[str, list[float]] = field(default_factory=dict)

    def mb_s(self, name: str) -> float:
        return self.bytes / MB / statistics.median(getattr(self, name))

    def note_resident(self, kind: str, files: list[Path]) -> None:
        total = sum(f.stat().st_size for f in files)
        share = sum(map(resident_bytes, files)) / total
        self.resident.setdefault(kind, []).append(share)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def dir_files(path: Path) -> list[Path]:
    return sorted(f for f in path.rglob("*") if f.is_file())


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache, so that the next read comes from the disk:
    fsync (a dirty page cannot be dropped), then POSIX_FADV_DONTNEED on the whole file.
    Unlike ``echo 3 > /proc/sys/vm/drop_caches`` it needs no root and touches nothing else."""
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]  # fmt: skip
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_MAP_FAILED = ctypes.c_void_p(-1).value


def resident_bytes(file: Path) -> int:
    """Bytes of ``file`` in the page cache, by mincore(2) on a mapping of it (mapping a
    file reads none of it), as util-linux's ``fincore`` counts them."""
    size = file.stat().st_size
    if size == 0:
        return 0
    fd = os.open(file, os.O_RDONLY)
    try:
        address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), f"mmap {file}")
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vector = (ctypes.c_ubyte * pages)()
            if _libc.mincore(address, size, vector) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {file}")
        finally:
            _libc.munmap(address, size)
    finally:
        os.close(fd)
    in_cache = int(np.count_nonzero(np.frombuffer(vector, dtype=np.uint8) & 1))
    return min(size, in_cache * mmap.PAGESIZE)


def _dd(*operands: str) -> float | None:
    """Wall seconds of one dd run, or None if it failed (e.g. O_DIRECT unsupported)."""
    start = time.perf_counter()
    done = subprocess.run(["dd", *operands, "status=none"], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    return elapsed if done.returncode == 0 else None


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_bandwidth(trainer: Trainer, args: argparse.Namespace, tmp: Path) -> Bandwidth:
    result = Bandwidth()
    root = trainer.cfg.checkpoint_dir
    dd_file = tmp / "dd.bin"  # beside the checkpoints: the same filesystem
    direct = True
    for rep in range(args.reps):
        for old in root.iterdir():  # a fresh directory each time, nothing to prune or replace
            shutil.rmtree(old)
        start = time.perf_counter()
        path = trainer.checkpoints.save(trainer.step, sync=True)
        result.save.append(time.perf_counter() - start)
        result.bytes = dir_bytes(path)
        files = dir_files(path)

        def load(path: Path = path) -> None:
            load_training_state(
                path, trainer.model_parts, trainer.optimizers, layout=trainer.job.layout
            )

        count = math.ceil(result.bytes / DD_BLOCK)
        scale = result.bytes / (count * DD_BLOCK)  # dd's times scaled to our bytes
        dd_file.unlink(missing_ok=True)
        block = f"bs={DD_BLOCK}"
        write = _dd("if=/dev/zero", f"of={dd_file}", block, f"count={count}", "conv=fdatasync")
        if write is None:
            raise SystemExit(f"dd could not write {dd_file}")
        result.dd_write.append(write * scale)
        read = [f"if={dd_file}", "of=/dev/null", block]

        # Warm: both read files they have just written, from the page cache.
        result.note_resident("load_warm", files)
        result.load_warm.append(_timed(load))
        result.note_resident("dd_read_warm", [dd_file])
        result.dd_read_warm.append(_dd(*read) * scale)
        # Cold: each evicts its files first, the same way, so both read the disk.
        evict(files)
        result.note_resident("load_cold", files)
        result.load_cold.append(_timed(load))
        evict([dd_file])
        result.note_resident("dd_read_cold", [dd_file])
        result.dd_read_cold.append(_dd(*read) * scale)
        # The checksum pass alone, from the disk and from the page cache.
        evict(files)
        result.verify_cold.append(_timed(lambda path=path: verify_checkpoint(path)))
        result.verify_warm.append(_timed(lambda path=path: verify_checkpoint(path)))
        if direct:
            evict([dd_file])
            seconds = _dd(*read, "iflag=direct")
            direct = seconds is not None
            if direct:
                result.dd_read_direct.append(seconds * scale)
        print(
            f"[bandwidth] {rep + 1}: {result.bytes / MB:.0f} MB; save {result.save[-1]:.2f} s, "
            f"dd write {result.dd_write[-1]:.2f} s; warm: load {result.load_warm[-1]:.2f} s, "
            f"dd {result.dd_read_warm[-1]:.2f} s; cold: load {result.load_cold[-1]:.2f} s, dd "
            f"{result.dd_read_cold[-1]:.2f} s; checksums cold {result.verify_cold[-1]:.2f} s, "
            f"warm {result.verify_warm[-1]:.2f} s"
            + (f"; dd iflag=direct {result.dd_read_direct[-1]:.2f} s" if direct else "")
            + "; resident before: "
            + ", ".join(f"{k} {v[-1]:.1%}" for k, v in result.resident.items()),
            flush=True,
        )
    dd_file.unlink(missing_ok=True)
    return result


# ----- reporting -----------------------------------------------------------------------------
def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def section_body(
    args: argparse.Namespace, trainer: Trainer, stall: Stall, bw: Bandwidth, command: str,
    load: tuple[tuple[float, ...], tuple[float, ...]],
) -> str:  # fmt: skip
    info = machine_info(torch.get_num_threads())
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    m = trainer.model_args
    n_params = sum(p.numel() for p in trainer.model.parameters())
    step = stall.plain_step
    stalls = stall.stalls()
    med_stall = statistics.median(stalls)
    blocked = statistics.median([w.blocked for w in stall.windows])
    windows = stall.windows
    med = statistics.median
    steps_per_window = med([len(w.step_times) for w in windows])
    waited = sum(w.waited for w in windows)
    pairs = {  # row: (ours, dd)
        "write": ("save", "dd_write"),
        "read, page cache (warm)": ("load_warm", "dd_read_warm"),
        "read, disk (cold)": ("load_cold", "dd_read_cold"),
    }
    ours_label = {
        "save": "`checkpoints.save(step, sync=True)`",
        "load_warm": "`load_training_state`",
        "load_cold": "`load_training_state`",
    }
    dd_label = {
        "dd_write": "`conv=fdatasync`",
        "dd_read_warm": "`of=/dev/null`",
        "dd_read_cold": "`of=/dev/null`",
    }
    ratios = {row: bw.mb_s(ours) / bw.mb_s(dd) for row, (ours, dd) in pairs.items()}
    rows = [
        "| | ours | ours MB/s | dd | dd MB/s | ours/dd | target >= 50% |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {row} | {ours_label[ours]} {med(getattr(bw, ours)):.2f} s | {bw.mb_s(ours):.0f} | "
            f"{dd_label[dd]} {med(getattr(bw, dd)):.2f} s | {bw.mb_s(dd):.0f} | "
            f"{ratios[row]:.0%} | {_met(ratios[row] >= BANDWIDTH_TARGET)} |"
            for row, (ours, dd) in pairs.items()
        ),
    ]
    if bw.dd_read_direct:
        rows.append(
            f"| read, disk (cross-check) | | | `iflag=direct` {med(bw.dd_read_direct):.2f} s | "
            f"{bw.mb_s('dd_read_direct'):.0f} | | |"
        )

    def resident(kind: str) -> str:
        shares = bw.resident[kind]
        low, high = min(shares), max(shares)
        return f"{low:.1%}" if f"{low:.1%}" == f"{high:.1%}" else f"{low:.1%} to {high:.1%}"

    fmt_load = lambda v: " ".join(f"{x:.2f}" for x in v)  # noqa: E731
    return "\n".join(
        [
            f"- Date: {date}",
            f"- Machine: {info['cpu']}; {info['software']}; {info['threads']} threads; "
            f"load average {fmt_load(load[0])} at start, {fmt_load(load[1])} at the end "
            "(the machine is shared)",
            f"- Command: `{command}`",
            f"- Model: {args.model} shape cut to {m.n_layers} layer{'s' * (m.n_layers != 1)} "
            f"({n_params / 1e6:.1f}M parameters), seq {args.seq_len}, micro-batch 1, fp32, "
            f"fused AdamW; checkpoint = weights + AdamW moments + trainer state + RNG + config "
            f"+ tokenizer = {stall.checkpoint_bytes / MB:.0f} MB on disk "
            f"(MB = 10^6 bytes), written with torch.distributed.checkpoint "
            f"({manifest.IO_THREADS} writer threads per rank), every file fsynced and hashed "
            "(SHA-256) for the manifest: in the background for an async save, before the "
            "commit for a synchronous one",
            "",
            "Stall of an async save (`checkpoint.async_save = true`, the default):",
            "",
            "| median plain step | save step + steps until committed | training loop blocked "
            "(save call + copy wait + commit) | blocked / step, target < 5% "
            "| stall incl. slowed steps | stall / step, target < 5% |",
            "|---|---|---|---|---|---|",
            f"| {step:.3f} s | {steps_per_window:.0f} steps, {med([sum(w.step_times) for w in windows]):.3f} s "
            f"| {blocked:.3f} s | {blocked / step:.1%}, {_met(blocked / step < STALL_TARGET)} "
            f"| {med_stall:.3f} s | {med_stall / step:.1%}, {_met(med_stall / step < STALL_TARGET)} |",
            "",
            f"Medians of {args.reps} saves, each after {args.plain} plain steps (plain-step "
            f"median over all {len(stall.plain)} of them, after {args.warmup} warmup steps and "
            "one unmeasured save). Steps run as `Trainer.fit` runs them: `train_step()`, then "
            "`checkpoints.poll()` (which commits a save whose writes are "
            "done), then `checkpoints.save(step)` on the save step. The window is the save step and "
            "every step after it until the commit (at least one), so staging, background "
            "writes competing with the step for the cores, and the commit all count; stall = "
            "window time - its steps x the plain step. Within it (medians): the "
            f"`checkpoints.save(step)` call {med([w.save_call for w in windows]):.3f} s (the small "
            "files; it starts the copy of the tensors to host memory in a background thread, "
            "`checkpoint.async_staging`), the wait for that copy before the next optimizer "
            f"step {med([w.staging_wait for w in windows]):.3f} s, the committing "
            "`checkpoints.finish` "
            f"{med([w.commit for w in windows]):.3f} s (manifest, rename, and a rename "
            "that hides the pruned checkpoint; the fsync, the hashing and the pruned files' "
            "deletion run in the background), and the rest, "
            f"{med([w.stall(step) - w.blocked for w in windows]):.3f} s, is steps slowed by "
            "the background copy, writer and hasher, which run on the cores the step computes "
            "on: a CPU trainer's cost that a GPU trainer's host cores absorb. "
            f"Stalls per save: {', '.join(f'{s:.3f}' for s in stalls)} s."
            + (
                f" {waited} of {len(windows)} saves were not committed after {args.max_follow} "
                "steps and were waited for."
                if waited
                else ""
            )
            + f" The last one checked complete: {stall.verified}.",
            "",
            f"Save and load bandwidth ({bw.bytes / MB:.0f} MB a checkpoint, medians of "
            f"{args.reps}; the same temporary directory for ours and dd):",
            "",
            *rows,
            "",
            "Ours: `checkpoints.save(step, sync=True)` of the trainer into an empty checkpoint "
            "directory (gather the state dicts, write with DCP, fsync and hash every file, "
            "write the manifest, rename), and `load_training_state(path, model_parts, "
            "optimizers, layout=...)` from it, as a resume runs it: verify sizes and SHA-256 "
            "of every file against the manifest, then read with DCP into the model and "
            "optimizer. dd: `dd if=/dev/zero of=FILE bs=4M count=N conv=fdatasync` with "
            "N x 4 MiB >= the checkpoint's bytes (times scaled to the same bytes), since our "
            "commit fsyncs every file, and `dd if=FILE of=/dev/null bs=4M`. Warm: each side "
            "reads the files it has just written, from the page cache (share of the bytes "
            f"resident just before the read, by mincore(2): ours {resident('load_warm')}, dd "
            f"{resident('dd_read_warm')}). Cold: before each cold read, each side's files "
            "are evicted from the page cache the same way, fsync then "
            "`posix_fadvise(POSIX_FADV_DONTNEED)` on every file (`/proc/sys/vm/drop_caches` "
            "is read-only in this container, and this evicts nothing else), and the eviction "
            "is checked with mincore(2) on a mapping of each file, as util-linux `fincore` "
            f"counts: resident just before the read, ours {resident('load_cold')}, dd "
            f"{resident('dd_read_cold')}"
            + f". A second check: dd's cold read takes {med(bw.dd_read_cold):.2f} s, its warm "
            f"read {med(bw.dd_read_warm):.2f} s"
            + (
                "; dd with `iflag=direct` (O_DIRECT: no page cache, and no read-ahead, one "
                "4 MiB request at a time), its file evicted first too, reads at "
                f"{bw.mb_s('dd_read_direct'):.0f} MB/s"
                if bw.dd_read_direct
                else "; O_DIRECT reads failed on this filesystem"
            )
            + ". The disk is a virtual machine's disk (/dev/vda, ext4): whatever the host "
            "caches beneath it is out of reach, for both sides alike. Ours and dd alternate "
            "within each repetition (save, dd write, warm reads, cold reads). Our load reads "
            "every byte twice: the checksum pass reads each file (from the disk, when cold), "
            "then DCP reads it again, from the page cache the first pass filled. The checksum "
            f"pass alone takes {med(bw.verify_cold):.2f} s cold and "
            f"{med(bw.verify_warm):.2f} s warm (timed apart from the loads); there is no "
            "user setting that skips it: a resume (`CheckpointManager.resume`) verifies every "
            "file, the hashing split across the ranks, then loads with `verified=True`; on "
            "one rank that is this load. So there is no row without it.",
        ]
    )


# ----- command line --------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Checkpoint cost: the stall an async save adds to training steps, and "
        "save/load bandwidth against dd on the same filesystem.",
    )
    parser.add_argument("--model", default="opt-125m", help="size name (default: opt-125m)")
    parser.add_argument("--layers", type=int, help="layers kept of the size (default 4; quick 1)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default 512; quick 128)")
    parser.add_argument(
        "--reps",
        type=int,
        help=f"measured saves, and save/load/dd repetitions; at least {MIN_REPS} (quick 2)",
    )
    parser.add_argument("--plain", type=int, help="plain steps before each save (default 3)")
    parser.add_argument("--warmup", type=int, help="unmeasured steps first (default 2)")
    parser.add_argument(
        "--max-follow",
        type=int,
        default=20,
        help="steps after a save to wait for its commit before blocking on it (default 20)",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        help="where the temporary directory goes: checkpoints and dd's file (default: $TMPDIR)",
    )
    parser.add_argument("--write", type=Path, metavar="FILE", help="replace this section in FILE")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 1 layer, seq 128, 2 repetitions"
    )
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.reps < MIN_REPS and not args.quick:
        parser.error(f"--reps must be at least {MIN_REPS} for a median (or use --quick)")
    if min(args.layers, args.seq_len, args.reps, args.plain, args.max_follow) < 1:
        parser.error("--layers, --seq-len, --reps, --plain and --max-follow must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="opt-ckpt-bench-", dir=args.dir) as name:
        tmp = Path(name)
        vocab = get_model_args(args.model).vocab_size
        data = ensure_builtin_dataset(tmp / "data", vocab_size=vocab)
        trainer = Trainer(load_config(None, config_overrides(args, data, tmp)))
        print(f"checkpoints and dd's file under {tmp}", flush=True)
        try:
            stall = measure_stall(trainer, args)
            bw = measure_bandwidth(trainer, args, tmp)
        finally:
            trainer.checkpoints.finish()
            if hasattr(trainer.loader, "close"):  # the PrefetchingLoader's thread
                trainer.loader.close()
        body = section_body(
            args, trainer, stall, bw, command_line(argv), (load_start, os.getloadavg())
        )
    print(f"\n{TITLE}\n\n{body}")
    if args.write:
        write_section(args.write, TITLE, body)
        print(f"wrote section {TITLE!r} to {args.write}")


if __name__ == "__main__":
    main()
