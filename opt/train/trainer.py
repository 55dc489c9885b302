"""The training loop: small step methods and a ``state_dict`` a supervisor can hook into."""

from __future__ import annotations

import contextlib
import math
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from opt import checkpoint as ckpt
from opt import dist as distributed
from opt.checkpoint.checkpointer import checkpoint_path
from opt.checkpoint.resume import newest_complete_checkpoint, verify_together
from opt.config import JobConfig, to_toml
from opt.data.prefetch import PrefetchingLoader
from opt.device import measure_matmul_peak
from opt.errors import OptError
from opt.faults import maybe_inject_fault
from opt.fsutil import atomic_write
from opt.host_memory import retain_freed_memory
from opt.job import check_job
from opt.models import kernels
from opt.models.flops import training_flops_per_token
from opt.models.model import cross_entropy
from opt.parallel.data_parallel import fsdp_param_dtype
from opt.parallel.grads import (
    align_grad_placements,
    clip_grads_,
    global_grad_norm,
    sum_over,
    sync_tied_embedding_grads,
)
from opt.parallel.parallelize import materialize, parallelize, tied_embedding_group
from opt.parallel.pipeline import build_schedule
from opt.run.energy import EnergyMeter
from opt.run.preemption import StopOnSignal
from opt.run.status import (
    FAILED,
    FINISHED,
    RUNNING,
    STOPPED_FOR_HUMAN,
    STOPPED_ON_SIGNAL,
)
from opt.supervisor.cli import INTERVENE_FILE
from opt.supervisor.logbook import Logbook
from opt.supervisor.supervisor import KILL_SWITCH_FILE, Decision, Supervisor
from opt.train import interventions, lifecycle
from opt.train.data_setup import build_loader, resolve_tokenizer_file
from opt.train.metrics import MetricsLogger
from opt.train.optim import LinearWarmupDecay, build_optimizer
from opt.train.precision import AUTOCAST_DTYPES, DynamicLossScaler, autocast


@dataclass
class StepResult:
    step: int
    loss: float
    grad_norm: float
    lr: float
    loss_scale: float
    skipped: bool
    decision: Decision = field(default_factory=Decision)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


class Trainer:
    """Owns model, optimizer, schedule, loss scaler, data stream and checkpoints of one run.

    Under a parallel layout each rank holds its part(s) of the model (one per local
    pipeline stage) and one optimizer per part; everything the loop decides on (loss, grad
    norm, skipping) is agreed across ranks, so every rank takes the same branch.
    """

    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        # Everything that needs no memory is checked first: a bad layout costs nothing.
        job = check_job(cfg, distributed.launched_world_size())
        self.job = job
        self.model_args, self.dims, self.grad_accum = job.model_args, job.dims, job.grad_accum
        self.device = _resolve_device(cfg.train.device)
        check_speed_switches(cfg, self.device)
        bf16_on_gpu = cfg.train.precision == "bf16" and self.device.type == "cuda"
        if bf16_on_gpu and not torch.cuda.is_bf16_supported():
            raise OptError("train.precision=bf16 needs a GPU with bf16 support")
        self.meshes = None
        if self.dims.world_size > 1:
            self.device = distributed.init_distributed(cfg.parallel.timeout_s, self.device.type)
            self.meshes = self.dims.build_meshes(self.device.type)
        self.bf16_via_fp32 = kernels.cpu_bf16_via_fp32(
            self.device, cfg.train.precision, cfg.train.cpu_bf16_compute
        )
        self.rank, _ = distributed.rank_and_world()
        pp_rank, dp_rank, tp_rank = self._coordinates()
        # Everything fallible about the data happens before the model is allocated.
        self.loader, self.dataset_prefix = distributed.first_rank_then_all(
            lambda: build_loader(cfg, self.model_args, dp_rank, self.dims.dp)
        )
        if cfg.data.prefetch:
            pin = cfg.data.pin_memory and self.device.type == "cuda"
            self.loader = PrefetchingLoader(self.loader, pin_memory=pin)
        if cfg.train.keep_host_memory:
            retain_freed_memory()
        # Dropout: the same masks across a TP group where activations are replicated, and
        # different ones where each rank holds its own sequence shard (SP) or batch.
        tp_stream = tp_rank if cfg.parallel.sequence_parallel else 0
        torch.manual_seed(
            cfg.run.seed + ((pp_rank * self.dims.dp + dp_rank) * self.dims.tp + tp_stream)
        )
        self.parallel = parallelize(
            self.model_args, self.dims, self.meshes, cfg.parallel, cfg.data.seq_len, pp_rank,
            compile_blocks=compile_enabled(cfg, self.device),
            fsdp_param_dtype=fsdp_param_dtype(cfg.train.precision, cfg.parallel),
            loss_chunk=cfg.train.loss_chunk, bf16_via_fp32=self.bf16_via_fp32,
        )  # fmt: skip
        materialize(self.parallel, self.device, cfg.run.seed)
        self.model_parts = self.parallel.parts
        # The fused head + loss (where the whole head is on this rank, outside TP).
        self.fused_loss = self.parallel.fused_loss
        self.model = self.model_parts[0]
        self.optimizers = [build_optimizer(part, cfg.optim) for part in self.model_parts]
        self.optimizer = self.optimizers[0]
        self.pp_group = self.meshes["pp"].get_group() if self.dims.pp > 1 else None
        self.dp_group = self.meshes["dp"].get_group() if self.dims.dp > 1 else None
        self.embed_group = (
            tied_embedding_group(self.meshes, self.dims) if self.dims.pp > 1 else None
        )
        self.pp_schedule = None
        if self.dims.pp > 1:
            self.pp_schedule = build_schedule(
                self.model_parts,
                self.parallel.stage_indices,
                self.parallel.n_stages,
                self.device,
                self.pp_group,
                cfg.parallel.pp_schedule,
                self.grad_accum,
                self._pipeline_loss,
            )
        self.schedule = LinearWarmupDecay(cfg.optim.lr, cfg.schedule, cfg.train.batch_tokens)
        self.scaler = DynamicLossScaler(cfg.loss_scale, enabled=cfg.train.precision == "fp16")
        self.max_steps = job.max_steps
        self.step = 0
        self.tokens_seen = 0
        # Multipliers the divergence supervisor lowers; checkpointed so they survive restarts.
        self.lr_scale = 1.0
        self.grad_clip = cfg.optim.grad_clip
        self.stop_requested = False
        self.stop_reason = ""
        self.human_needed = False
        self.supervisor = (
            Supervisor(cfg.supervisor, self.device) if cfg.supervisor.enabled else None
        )
        self.logbook = Logbook(cfg.logbook.dir, cfg.run.name) if self.rank == 0 else None
        self.pending_checkpoint: ckpt.PendingCheckpoint | None = None
        self.checkpoint_stager = None  # made at the first async save: ckpt.BackgroundStager
        self.staging_wait_s = 0.0  # time train_step waited for a background copy, in all
        self.pruning: Future | None = None  # rank 0: old checkpoints being deleted
        self.last_saved_step = -1
        self.stopped_on_signal = False
        # The scheduler's warning signal (set by `opt launch slurm`): stop and save.
        self.stop_signal = StopOnSignal.from_environment(self.device)
        self.energy = EnergyMeter(self.device, self.dims.world_size, cfg.logbook.pue,
                                  cfg.logbook.carbon_intensity)  # fmt: skip
        self.reconciled: dict | None = None  # a rollback finished from the logbook at resume
        # Background checkpoint writes get their own gloo group: their collectives must
        # not interleave with the training loop's on the default group.
        self.checkpoint_group = None
        if cfg.checkpoint.async_save and self.dims.world_size > 1:
            self.checkpoint_group = torch.distributed.new_group(backend="gloo")

    def _coordinates(self) -> tuple[int, int, int]:
        """This rank's (pipeline, data-parallel, tensor-parallel) index."""
        if self.meshes is None:
            return 0, 0, 0
        return (
            self.meshes["pp"].get_local_rank(),
            self.meshes["dp"].get_local_rank(),
            self.meshes["tp"].get_local_rank(),
        )

    @property
    def layout(self) -> dict:
        return self.job.layout

    # ----- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "lr_scale": self.lr_scale,
            "grad_clip": self.grad_clip,
            "loss_scaler": self.scaler.state_dict(),
            "data": self.loader.state_dict(),
            **({"supervisor": self.supervisor.state_dict()} if self.supervisor else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.lr_scale = float(state["lr_scale"])
        self.grad_clip = float(state["grad_clip"])
        self.scaler.load_state_dict(state["loss_scaler"])
        self.loader.load_state_dict(state["data"])
        if self.supervisor is not None and "supervisor" in state:
            self.supervisor.load_state_dict(state["supervisor"])

    # ----- one step ------------------------------------------------------------------------
    def _loss_context(self) -> contextlib.AbstractContextManager:
        """Vocab-parallel cross-entropy on vocab-sharded logits under TP (forward and
        backward): the full logits are never gathered."""
        if self.dims.tp > 1:
            from torch.distributed.tensor.parallel import loss_parallel

            return loss_parallel()
        return contextlib.nullcontext()

    def _compute_context(self) -> contextlib.ExitStack:
        """Autocast and the chosen attention kernel, around every forward."""
        stack = contextlib.ExitStack()
        stack.enter_context(autocast(self.cfg.train.precision, self.device))
        stack.enter_context(kernels.attention_backend(self.cfg.train.attention))
        return stack

    def forward_backward_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss of one micro-batch, backpropagated with the 1/grad_accum weight."""
        if self.fused_loss:
            with self._compute_context():
                loss = self.model(inputs, targets)
            self.scaler.scale_loss(loss / self.grad_accum).backward()
            return loss.detach()
        with self._compute_context():
            logits = self.model(inputs)  # (B, T, V), vocab-sharded under TP
        with self._loss_context():
            loss = cross_entropy(logits, targets)
            self.scaler.scale_loss(loss / self.grad_accum).backward()
        return _full(loss.detach())

    def _pipeline_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale_loss(cross_entropy(logits, targets))

    def pipeline_forward_backward(self, microbatches: list) -> torch.Tensor:
        """One schedule run over all microbatches of the step; returns the mean loss on the
        last stage (zero elsewhere, summed over the pipeline by the caller)."""
        inputs = torch.cat([i for i, _ in microbatches]).to(self.device)
        targets = torch.cat([t for _, t in microbatches]).to(self.device)
        args = (inputs,) if self.parallel.has_first_stage else ()
        losses: list[torch.Tensor] = []
        kwargs = {"target": targets, "losses": losses} if self.parallel.has_last_stage else {}
        with self._compute_context(), self._loss_context():
            self.pp_schedule.step(*args, **kwargs)
        if not losses:
            return torch.zeros((), device=self.device)
        return torch.stack([_full(x).detach().float() for x in losses]).mean() / self.scaler.scale

    def _mean_over_ranks(self, loss: torch.Tensor) -> float:
        loss = loss.detach().float().reshape(1).clone()
        sum_over(loss, self.pp_group)  # only the last stage holds a non-zero loss
        sum_over(loss, self.dp_group)
        return float(loss) / self.dims.dp

    def train_step(self) -> StepResult:
        for part in self.model_parts:
            part.train()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        microbatches = list(self.loader.next_microbatches(self.grad_accum))
        if self.pp_schedule is not None:
            loss = self.pipeline_forward_backward(microbatches)
        else:
            losses = [
                self.forward_backward_step(
                    inputs.to(self.device, non_blocking=True),
                    targets.to(self.device, non_blocking=True),
                )
                for inputs, targets in microbatches
            ]
            loss = torch.stack(losses).mean()
        step = self.step + 1
        drill = self.supervisor.drill_at(step) if self.supervisor else None
        if drill is not None:
            loss = self._inject_drill(drill, loss)
        params = self.parallel.parameters()
        align_grad_placements(params)
        sync_tied_embedding_grads(self.parallel.tied_embeddings(), self.embed_group)
        self.scaler.unscale_(params)
        grad_norm = global_grad_norm(self.parallel.norm_parameters(), self.pp_group)
        loss_value = self._mean_over_ranks(loss)
        # A non-finite norm is an fp16 overflow (or a diverged step): the update is dropped.
        # The norm and loss are global, so every rank decides the same.
        overflow = not math.isfinite(grad_norm)
        decision = Decision()
        if self.supervisor is not None:
            decision = self.supervisor.inspect(
                step, loss_value, grad_norm, overflow and self.scaler.enabled,
                self.scaler.scale, self.scaler.at_floor, self._control_file(KILL_SWITCH_FILE),
                self._control_file(INTERVENE_FILE),
            )  # fmt: skip
        skipped = overflow or decision.drops_update
        lr = self.schedule(self.step) * self.lr_scale
        if self.supervisor is not None:
            lr *= self.supervisor.lr_multiplier(step)
        if not skipped:
            self.wait_until_staged()
            clip_grads_(params, self.grad_clip, grad_norm)
            for optimizer in self.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.step()
        self.scaler.update(overflow=overflow)
        self.step += 1
        self.tokens_seen += self.cfg.train.batch_tokens
        return StepResult(
            self.step, loss_value, grad_norm, lr, self.scaler.scale, skipped, decision
        )

    @torch.no_grad()
    def _inject_drill(self, kind: str, loss: torch.Tensor) -> torch.Tensor:
        """A deterministic fault: a spike multiplies loss and gradients, nan poisons them,
        scale_collapse drops the fp16 loss scale to its floor."""
        grads = [p.grad for p in self.parallel.parameters() if p.grad is not None]
        if kind == "scale_collapse":
            self.scaler.scale = self.scaler.min_scale
            return loss
        factor = float("nan") if kind == "nan" else 10.0
        torch._foreach_mul_(grads, factor)
        return loss * (factor if kind == "nan" else 3.0)

    def _control_file(self, name: str) -> bool:
        """An operator's file in the run directory (checked on rank 0; the supervisor's
        per-step vote tells every rank)."""
        return self.rank == 0 and (self.cfg.run_dir / name).exists()

    def log_event(self, kind: str, **fields) -> None:
        if self.logbook is not None:
            self.logbook.append(kind, **fields)

    def should_continue_training(self) -> bool:
        return self.step < self.max_steps and not self.stop_requested

    # ----- checkpoints ---------------------------------------------------------------------
    def save_checkpoint(self, sync: bool = False) -> Path:
        extra = {"config.toml": to_toml(self.cfg).encode()}
        tokenizer = resolve_tokenizer_file(self.cfg, self.dataset_prefix)
        if tokenizer is not None:
            extra["tokenizer.json"] = tokenizer.read_bytes()
        self.finish_checkpoint()  # at most one save in flight
        async_save = self.cfg.checkpoint.async_save and not sync
        if async_save and self.cfg.checkpoint.async_staging and self.checkpoint_stager is None:
            self.checkpoint_stager = ckpt.BackgroundStager(self.device)
        result = ckpt.save_checkpoint(
            checkpoint_path(self.cfg.checkpoint_dir, self.step),
            model=self.model_parts,
            model_args=self.model_args,
            optimizer=self.optimizers,
            trainer_state=self.state_dict(),
            extra_files=extra,
            layout=self.layout,
            async_save=async_save,
            process_group=self.checkpoint_group,
            stager=self.checkpoint_stager,
        )
        self.last_saved_step = self.step
        if isinstance(result, ckpt.PendingCheckpoint):
            self.pending_checkpoint = result
            return result.final
        self._prune()
        distributed.barrier()
        return result

    def finish_checkpoint(self, only_if_done: bool = False) -> None:
        """Commit an async save whose writes are complete (waiting for them unless
        ``only_if_done``). Each rank decides alone; only rank 0 commits and prunes."""
        pending = self.pending_checkpoint
        if pending is None or (only_if_done and not pending.done()):
            return
        pending.finish()
        self.pending_checkpoint = None
        # Deleting the oldest checkpoint's files would cost the loop as much as the commit.
        self._prune(background=True)

    def wait_until_staged(self) -> None:
        """Before anything changes the weights or the optimizer state in place: an async
        save's background copy of them must be complete."""
        if self.pending_checkpoint is not None:
            start = time.perf_counter()
            self.pending_checkpoint.wait_until_staged()
            self.staging_wait_s += time.perf_counter() - start

    def close_checkpoint_stager(self) -> None:
        """Free the host buffers of background staging (after the last save's commit)."""
        if self.checkpoint_stager is not None:
            self.checkpoint_stager.close()
            self.checkpoint_stager = None

    def _prune(self, background: bool = False) -> None:
        if self.rank == 0:
            self.wait_for_pruning()
            self.pruning = ckpt.prune_checkpoints(
                self.cfg.checkpoint_dir,
                self.cfg.checkpoint.keep_last,
                protect=interventions.protected_checkpoints(self),
                background=background,
            )

    def wait_for_pruning(self) -> None:
        """Until the checkpoints pruned in the background are deleted (rank 0)."""
        if self.pruning is not None:
            self.pruning.result()
            self.pruning = None

    def restore(self) -> Path | None:
        """Resume per ``checkpoint.resume``, or start from ``init_from`` weights; returns the source."""
        source = self._resume_source()
        if source is not None:
            self._check_same_shape(source)
            state = ckpt.load_training_state(
                source, self.model_parts, self.optimizers, layout=self.layout, verified=True
            )
            self.load_state_dict(state)
            if self.supervisor is not None:
                self.reconciled = interventions.reconcile_with_logbook(self, source)
            return source
        if self.cfg.checkpoint.init_from:
            source = Path(self.cfg.checkpoint.init_from)
            self._check_same_shape(source)
            ckpt.load_model_weights(source, self.model_parts)
            return source
        return None

    def _resume_source(self) -> Path | None:
        resume = self.cfg.checkpoint.resume
        if resume == "none":
            return None
        if resume == "auto":
            return newest_complete_checkpoint(self.cfg.checkpoint_dir, self._checkpoint_skipped)
        problem = verify_together(Path(resume))
        if problem is not None:
            raise OptError(problem)
        return Path(resume)

    def _checkpoint_skipped(self, path: Path, problem: str) -> None:
        print(f"warning: skipping {path}: {problem}", flush=True)
        self.log_event("checkpoint_skipped", checkpoint=str(path), problem=problem,
                       set_aside_as=path.name + ".corrupt")  # fmt: skip

    def _check_same_shape(self, source: Path) -> None:
        saved = ckpt.load_model_args(source)
        if saved != self.model_args:
            raise OptError(
                f"checkpoint {source} holds a different model shape than {self.cfg.model.name}"
            )

    # ----- the loop ------------------------------------------------------------------------
    def fit(self) -> list[StepResult]:
        cfg = self.cfg
        source = self.restore()
        lead = self.rank == 0
        if source is not None and lead:
            print(f"resumed from {source} at step {self.step}", flush=True)
        # Written only once the inputs have proven loadable: a failed start leaves no run dir.
        if lead:
            lifecycle.log_start(self, source)
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(cfg.run_dir / "config.toml", to_toml(cfg))
            lifecycle.write_status(self, RUNNING, source=str(source) if source else None)
        metrics = self._metrics_logger() if lead else None
        results, tokens_since_log = [], 0
        try:
            while self.should_continue_training():
                if self.stop_signal is not None and (received := self.stop_signal.agreed()):
                    lifecycle.stop_on_signal(self, received)
                    break
                maybe_inject_fault(self.rank, self.step + 1)
                result = self.train_step()
                results.append(result)
                self.finish_checkpoint(only_if_done=True)
                if result.decision.manual:  # first, so a stop's checkpoint includes it
                    interventions.apply_manual(self)
                if not result.decision.healthy:
                    interventions.carry_out(self, result)
                    if lead:
                        print(f"supervisor: step {result.step}: {result.decision.rung or 'stop'}"
                              f" ({result.decision.anomaly.detector if result.decision.anomaly else result.decision.reason})", flush=True)  # fmt: skip
                elif self.supervisor is not None and (outcome := self.supervisor.pop_outcome()):
                    self.log_event("outcome", step=self.step, tokens=self.tokens_seen, **outcome)
                if self.stop_requested or self.step < result.step:
                    continue  # stopped, or rolled back: nothing of this step to log or save
                tokens_since_log += cfg.train.batch_tokens
                if self.step % cfg.metrics.log_every == 0 or self.step == self.max_steps:
                    if metrics is not None:
                        metrics.log(self.step, tokens_since_log, _log_values(result))
                    tokens_since_log = 0
                if self.step % cfg.checkpoint.every == 0 or self.step == self.max_steps:
                    if metrics is not None:
                        metrics.pause()
                    self.save_checkpoint()
                    if metrics is not None:
                        metrics.resume()
                if lead:
                    lifecycle.write_status(self, RUNNING, loss=result.loss)
            self.finish_checkpoint()
            self.close_checkpoint_stager()
            self.wait_for_pruning()  # a finished run leaves exactly keep_last checkpoints
        except BaseException as err:
            error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            self.log_event("run_stop", step=self.step, tokens=self.tokens_seen,
                           reason=f"error: {error}", **self.energy.usage())  # fmt: skip
            if lead:
                lifecycle.write_status(self, FAILED, error=error)
            raise
        finally:
            if metrics is not None:
                metrics.close()
            if isinstance(self.loader, PrefetchingLoader):
                self.loader.close()
            if self.stop_signal is not None:
                self.stop_signal.restore_defaults()
        reason = self.stop_reason or "finished: reached max_steps"
        self.log_event("run_stop", step=self.step, tokens=self.tokens_seen, reason=reason,
                       **self.energy.usage())  # fmt: skip
        if lead:
            state = STOPPED_FOR_HUMAN if self.human_needed else FINISHED
            lifecycle.write_status(self, STOPPED_ON_SIGNAL if self.stopped_on_signal else state,
                               reason=reason)  # fmt: skip
        return results

    def _metrics_logger(self) -> MetricsLogger:
        cfg = self.cfg
        peak = cfg.metrics.peak_tflops * 1e12
        if peak <= 0:
            dtype = AUTOCAST_DTYPES.get(cfg.train.precision, torch.float32)
            peak = measure_matmul_peak(dtype, self.device, bf16_via_fp32=self.bf16_via_fp32)
        tb_dir = cfg.run_dir / "tensorboard" if cfg.metrics.tensorboard else None
        # Tokens are counted globally, so per-device MFU divides the work over every rank.
        flops = training_flops_per_token(self.model_args, cfg.data.seq_len)
        flops /= self.dims.world_size
        return MetricsLogger(tb_dir, flops, peak)


def _log_values(result: StepResult) -> dict[str, float]:
    return {
        "loss": result.loss,
        "grad_norm": result.grad_norm,
        "lr": result.lr,
        "loss_scale": result.loss_scale,
    }


def compile_enabled(cfg: JobConfig, device: torch.device) -> bool:
    """``train.compile``; auto compiles on GPUs only: on CPUs inductor's blocks measured
    slower than eager ones (BENCHMARKS.md), and compiling costs time at every start."""
    if cfg.train.compile == "auto":
        return device.type == "cuda"
    return cfg.train.compile == "on"


def check_speed_switches(cfg: JobConfig, device: torch.device) -> None:
    if device.type != "cuda" and cfg.train.attention in ("efficient", "cudnn"):
        raise OptError(f"train.attention={cfg.train.attention} needs a GPU; use flash or math")


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise OptError("train.device=cuda but no CUDA device is available")
    return torch.device(name)
