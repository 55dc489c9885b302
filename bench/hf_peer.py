"""transformers' OPTForCausalLM trained the way ``Trainer.train_step`` trains ours, in a
process of its own, so it runs with everything at the defaults a transformers user has
(glibc's allocator settings included: our trainer changes them for its own process).

The benchmark starts ``python bench/hf_peer.py CONFIG_JSON`` and drives it over stdin and
stdout, one JSON line per command, so steps still alternate with ours:

    {"cmd": "step"}          -> {"seconds": s, "loss": x, "faults": n}
    {"cmd": "kernels"}       -> {"attention": "...", "optimizer": "..."} (one profiled step)
    {"cmd": "compile", "mode": m} -> {"peak_bytes": n} (compiles in place; GPU peak so far,
                                 then reset, so the compiled steps' peak is their own)
    {"cmd": "profile", "steps": n} -> {"text": "..."}
    {"cmd": "quit"}          -> {"peak_bytes": n} (GPU memory at its peak; 0 on a CPU)

The model is a randomly initialised ``OPTForCausalLM`` (``attn_implementation`` left at its
default, sdpa; ``use_cache`` off, as for any training) holding our initial weights for the
same seed, with HF's own loss, ``build_optimizer`` (the same fused AdamW and decay grouping)
and ``clip_grad_norm_``. Two settings a user may choose are offered, each off by default:
``compile`` ("model": ``torch.compile`` of the whole model, what transformers' own Trainer
does with ``torch_compile=True``; "layers": of each decoder layer) and ``keep_host_memory``
(the glibc allocator setting our trainer makes, opt/host_memory.py, applied in this worker
before anything is allocated). Its batches come from a loader over the same stream as ours,
so step i of both sides sees the same tokens. HF's loss shifts ``labels`` internally, which would
leave seq_len - 1 predictions; passing ``shift_labels=targets`` as well makes it score the
same seq_len predictions as ours, on the same (B, seq_len) input.

On a GPU the model is built on the card, where HF's own init takes seconds, and our weights
are drawn there too (a 6.7B model drawn on the host and copied would cost minutes). Where
the run recomputes activations (``parallel.activation_checkpoint = "full"``), HF does too,
through its own activation checkpointing; it has no selective mode.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may come from the hub

import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

from opt.config import load_config
from opt.convert.hf import hf_config_from_args, our_key_to_hf
from opt.host_memory import retain_freed_memory
from opt.job import resolve_model_args
from opt.models.model import build_model
from opt.train.data_setup import build_loader
from opt.train.optim import LinearWarmupDecay, build_optimizer
from opt.train.precision import autocast

sys.path.insert(0, str(Path(__file__).parent))
from profiling import profile_steps

COMPILE_MODES = ("none", "model", "layers")


class HFSide:
    def __init__(self, overrides: list[str], compile_mode: str = "none"):
        cfg = load_config(None, overrides)
        model_args = resolve_model_args(cfg)
        self.device = torch.device(cfg.train.device)
        self.precision = cfg.train.precision
        self.grad_clip = cfg.optim.grad_clip
        self.schedule = LinearWarmupDecay(cfg.optim.lr, cfg.schedule, cfg.train.batch_tokens)
        self.step = 0
        hf_config = transformers.OPTConfig(**hf_config_from_args(model_args))
        hf_config.use_cache = False  # a KV cache is for generation, not training
        with torch.device(self.device):
            self.model = transformers.OPTForCausalLM(hf_config)
        _copy_weights(build_model(model_args, self.device, cfg.run.seed), self.model)
        recompute = cfg.parallel.activation_checkpoint
        if recompute == "full":  # renamed in transformers 5.x; the old name warns there
            enable = getattr(self.model, "activation_checkpointing_enable", None)
            (enable or self.model.gradient_checkpointing_enable)()
        elif recompute != "none":
            raise SystemExit(f"HF has no {recompute!r} activation checkpointing")
        self.compile(compile_mode)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # our copy of the weights is gone
            torch.cuda.reset_peak_memory_stats()
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.loader, _ = build_loader(cfg, model_args)

    def compile(self, mode: str) -> None:
        """torch.compile in place, so parameter names (and the optimizer's) stay."""
        if mode == "model":
            self.model.compile()
        elif mode == "layers":
            for layer in self.model.model.decoder.layers:
                layer.compile()
        elif mode != "none":
            raise SystemExit(f"unknown HF compile mode {mode!r}; one of {COMPILE_MODES}")

    @property
    def attn_implementation(self) -> str:
        return self.model.config._attn_implementation

    def train_step(self) -> float:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        ((inputs, targets),) = self.loader.next_microbatches(1)
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        with autocast(self.precision, self.device):
            # labels= is what turns HF's loss on; shift_labels= makes it score all seq_len
            # targets instead of dropping the last one after its internal shift.
            loss = self.model(input_ids=inputs, labels=inputs, shift_labels=targets).loss
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip > 0 else math.inf
        # float() as in the trainer, which reads the norm to skip fp16 overflow steps.
        float(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedule(self.step)
        self.optimizer.step()
        self.step += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # the optimizer's kernels are part of the step
        return float(loss.detach())


# SDPA's fused kernels by their aten op; an SDPA call with none of them ran the math path.
SDPA_KERNELS = (
    ("_scaled_dot_product_flash_attention_for_cpu", "SDPA flash (CPU kernel)"),
    ("_scaled_dot_product_flash_attention", "SDPA flash"),
    ("_scaled_dot_product_efficient_attention", "SDPA memory-efficient"),
    ("_scaled_dot_product_cudnn_attention", "SDPA cuDNN"),
)


def observed_kernels(step) -> dict[str, str]:
    """The attention kernel and AdamW implementation one call of ``step`` ran, read from the
    aten ops a torch.profiler pass records (not from the settings that should choose them)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    names = {event.name for event in prof.events()}
    attention = next(
        (label for op, label in SDPA_KERNELS if any(op in name for name in names)),
        "SDPA math" if any("scaled_dot_product" in name for name in names) else "not seen",
    )
    if any("_fused_adamw" in name for name in names):
        optimizer = "fused AdamW"
    elif any("_foreach_" in name for name in names):
        optimizer = "foreach AdamW"
    else:
        optimizer = "AdamW (per tensor)"
    return {"attention": attention, "optimizer": optimizer}


@torch.no_grad()
def _copy_weights(ours: torch.nn.Module, hf: torch.nn.Module) -> None:
    hf_state = hf.state_dict()
    copied = set()
    for key, value in ours.state_dict().items():
        hf_key = our_key_to_hf(key)
        hf_state[hf_key].copy_(value)
        copied.add(hf_key)
    missing = set(hf_state) - copied - {"lm_head.weight"}  # lm_head is tied to embed_tokens
    if missing:
        raise RuntimeError(f"HF parameters with no counterpart in our model: {sorted(missing)}")


class HFPeer:
    """The benchmark's handle on the worker process."""

    def __init__(
        self,
        overrides: list[str],
        threads: int,
        compile_mode: str = "none",
        keep_host_memory: bool = False,
    ):
        spec = json.dumps(
            {
                "overrides": overrides,
                "threads": threads,
                "compile": compile_mode,
                "keep_host_memory": keep_host_memory,
            }
        )
        self.proc = subprocess.Popen(
            [sys.executable, __file__, spec], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
        hello = self._read()
        self.attn_implementation = hello["attention"]
        self.keep_host_memory = hello["keep_host_memory"]  # False where glibc is absent
        self.peak_bytes = 0.0

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the HF worker exited with status {self.proc.wait()}")
        return json.loads(line)

    def _ask(self, **command) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def train_step(self) -> tuple[float, float, int]:
        """(seconds, loss, minor page faults) of one step, timed inside the worker."""
        reply = self._ask(cmd="step")
        return reply["seconds"], reply["loss"], reply["faults"]

    def kernels(self) -> dict[str, str]:
        """One more step, profiled: the attention kernel and AdamW it ran."""
        return self._ask(cmd="kernels")

    def compile(self, mode: str) -> float:
        """Compile the worker's model in place (a GPU run reuses one eager model rather than
        build it twice); its peak GPU memory so far, after which the peak is reset."""
        return self._ask(cmd="compile", mode=mode)["peak_bytes"]

    def profile(self, steps: int) -> str:
        return self._ask(cmd="profile", steps=steps)["text"]

    def close(self) -> float:
        """Stop the worker (once); its peak GPU memory in bytes (0 on a CPU)."""
        if self.proc.poll() is None:
            self.peak_bytes = self._ask(cmd="quit")["peak_bytes"]
            self.proc.stdin.close()
        self.proc.wait(timeout=60)
        return self.peak_bytes


def _serve(spec: dict) -> None:
    torch.set_num_threads(spec["threads"])
    # Before the model allocates anything, as the trainer does it (opt/train/build.py).
    kept = retain_freed_memory() if spec["keep_host_memory"] else False
    transformers.logging.set_verbosity_error()
    side = HFSide(spec["overrides"], spec["compile"])
    out = sys.stdout
    sys.stdout = sys.stderr  # anything else printed must not corrupt the protocol
    hello = {"attention": side.attn_implementation, "keep_host_memory": kept}
    out.write(json.dumps(hello) + "\n")
    out.flush()
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "quit":
            cuda = side.device.type == "cuda"
            peak = torch.cuda.max_memory_allocated() if cuda else 0
            out.write(json.dumps({"peak_bytes": peak}) + "\n")
            out.flush()
            return
        if command["cmd"] == "step":
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            if side.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            loss = side.train_step()
            seconds = time.perf_counter() - start
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            reply = {"seconds": seconds, "loss": loss, "faults": faults}
        elif command["cmd"] == "kernels":
            reply = observed_kernels(side.train_step)
        elif command["cmd"] == "compile":
            cuda = side.device.type == "cuda"
            reply = {"peak_bytes": torch.cuda.max_memory_allocated() if cuda else 0}
            side.compile(command["mode"])
            if cuda:
                torch.cuda.reset_peak_memory_stats()
        else:
            reply = {"text": profile_steps(side.train_step, command["steps"], "HF")}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    _serve(json.loads(sys.argv[1]))
