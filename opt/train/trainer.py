"""The training loop and the step.

The trainer is built from a job (opt/job.py) by small builders (opt/train/build.py) and
hands the rest to the pieces that own it: checkpoints to the CheckpointManager, decisions
about divergence to the Supervisor (carried out by Interventions), and everything the run
tells the world to the RunRecorder. Under a parallel layout each rank holds its part(s) of
the model and one optimizer per part; everything the loop branches on is agreed across
ranks once per step (opt/train/agreement.py), so every rank takes the same branch.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from opt import dist
from opt.checkpoint.checkpointer import checkpoint_path
from opt.checkpoint.manager import CheckpointManager
from opt.config import JobConfig
from opt.data.prefetch import PrefetchingLoader
from opt.device import mfu_peak
from opt.faults import maybe_inject_fault
from opt.finetune.stream import IGNORE_INDEX
from opt.job import check_job
from opt.models import kernels
from opt.models.flops import training_flops_per_token
from opt.models.model import cross_entropy
from opt.parallel.grads import (
    align_grad_placements,
    clip_grads_,
    stage_grad_norm,
    sync_tied_embedding_grads,
)
from opt.run.control import ControlFiles
from opt.run.logbook.events import DownstreamEval, StragglerDetected
from opt.run.preemption import StopOnSignal
from opt.run.recorder import RunRecorder
from opt.run.status import FINISHED, RUNNING, STOPPED_ON_SIGNAL, STOPPED_STRAGGLER, Stop
from opt.run.watchdog import Watchdog
from opt.supervisor.rollback import Factors
from opt.supervisor.supervisor import Decision, Supervisor
from opt.train import build
from opt.train.activation_watch import LastLayerWatch
from opt.train.agreement import Shares, agree
from opt.train.data_setup import mixture_lines, resolve_tokenizer_file
from opt.train.downstream import DownstreamEvaluator, plan_downstream
from opt.train.evaluate import Evaluation, Evaluator, MicroBatches
from opt.train.interventions import Interventions
from opt.train.metrics import MetricsLogger
from opt.train.optim import LinearWarmupDecay, build_optimizer
from opt.train.precision import AUTOCAST_DTYPES, DynamicLossScaler, autocast
from opt.train.straggler import Slow, StragglerWatch


@dataclass
class StepResult:
    step: int
    loss: float
    grad_norm: float
    lr: float
    loss_scale: float
    skipped: bool
    decision: Decision = field(default_factory=Decision)
    stop_signal: bool = False  # some rank received the scheduler's warning signal
    drill: str | None = None  # the fault drill injected into this step, if any
    activation_rms: float = math.nan  # root mean square of the last block's output


@dataclass
class Progress:
    """Optimizer steps taken and tokens trained on (checkpointed)."""

    step: int = 0
    tokens_seen: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])


def answer_weight(batch, dp: int, grad_accum: int) -> float:
    """Fine-tuning's loss weight per answer token of a micro-batch: a micro-batch's mean
    over its answer tokens, times their count and ``dp * grad_accum / (the global batch's
    answer tokens)``, then divided by ``grad_accum`` as every micro-batch's loss is and
    averaged over the data-parallel ranks as every gradient is, gives each answer token of
    the global batch the same weight (T0's per-token mean; packed rows hold unequal counts)."""
    return dp * grad_accum / batch.step_loss_tokens


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


class Trainer:
    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        # Everything that needs no memory is checked first: a bad layout costs nothing.
        self.job = job = check_job(cfg, dist.launched_world_size())
        self.model_args, self.dims, self.grad_accum = job.model_args, job.dims, job.grad_accum
        # Downstream tasks checked before anything is built: a bad name or folder costs nothing.
        downstream_plan = plan_downstream(
            cfg.downstream, self.dims.tp, self.dims.pp, cfg.parallel.sequence_parallel
        )
        self.where = where = build.place(job)
        self.device, self.rank = where.device, where.rank
        self.loader, dataset_prefix = build.build_data(job, where)
        held_out, self.validation_plan = build.build_validation(job, where, dataset_prefix)
        # bf16 matmuls on a CPU without bf16 instructions run as exact fp32 ones (kernels.py).
        self.bf16_via_fp32 = kernels.cpu_bf16_via_fp32(
            self.device, cfg.train.precision, cfg.train.cpu_bf16_compute
        )
        self.parallel = build.build_model(job, where, self.bf16_via_fp32)
        self.model_parts = self.parallel.parts
        self.model = self.model_parts[0]
        self.optimizers = [build_optimizer(part, cfg.optim) for part in self.model_parts]
        self.optimizer = self.optimizers[0]
        self._pipeline_answer_weight: float | None = None  # fine-tuning, per step
        self.pp_schedule = build.build_pipeline(job, where, self.parallel, self._pipeline_loss)
        self.embed_group = build.embedding_group(job, where)
        self.fused_loss = self.parallel.fused_loss  # the head and the loss in one, chunked
        self.schedule = LinearWarmupDecay(cfg.optim.lr, cfg.schedule, cfg.train.batch_tokens)
        self.scaler = DynamicLossScaler(cfg.loss_scale, enabled=cfg.train.precision == "fp16")
        self.max_steps = job.max_steps
        self.progress = Progress()
        self.factors = Factors(lr_scale=1.0, grad_clip=cfg.optim.grad_clip)
        self.supervisor = None
        if cfg.supervisor.enabled:  # its blow-up level: the loss of predicting uniformly
            self.supervisor = Supervisor(cfg.supervisor, math.log(self.model_args.vocab_size))
        self.recorder = RunRecorder(cfg, self.rank, self.device, self.dims.world_size)
        self.control = ControlFiles(cfg.run_dir, lead=self.rank == 0)
        # The scheduler's warning signal (set by `opt launch slurm`): stop and save.
        self.stop_signal = StopOnSignal.from_environment()
        self.stop: Stop | None = None  # why the run ended early, once it has
        self.reconciled = None  # a rollback finished from the logbook at resume
        self.shares = Shares.of(where, self.dims, self.parallel.has_last_stage)
        # The last block's activation norm: logged, and the supervisor's early warning.
        self.activations = LastLayerWatch(
            self.model_parts, self.model_args.n_layers, self.grad_accum
        )
        # Each rank's own compute, agreed every few steps: a slow node is named (after
        # the model is sharded: its hooks must follow FSDP's, see straggler.py).
        self.stragglers = StragglerWatch.build(
            cfg.resilience, self.model_parts, self.device, self.rank, self.dims.world_size
        )
        self.watchdog: Watchdog | None = None  # while fit runs, with hang_timeout_s set
        self.metrics: MetricsLogger | None = None  # rank 0, while fit runs
        self.evaluator = None
        if held_out is not None:
            self.evaluator = Evaluator(
                held_out, self.forward_losses, self.model_parts,
                holds_loss=self.shares.holds_loss, device=self.device, report=self._validated,
            )  # fmt: skip
        self.downstream = None
        if downstream_plan is not None:
            self.downstream = DownstreamEvaluator(
                cfg.downstream, downstream_plan, self.model_parts,
                resolve_tokenizer_file(cfg, dataset_prefix), device=self.device,
                compute_context=self._compute_context, report=self._downstream_evaluated,
                tp=self.dims.tp,
            )  # fmt: skip
        self.checkpoints = CheckpointManager(
            cfg.checkpoint,
            cfg.checkpoint_dir,
            model_parts=self.model_parts,
            optimizers=self.optimizers,
            states=self._states(),
            model_args=self.model_args,
            layout=job.layout,
            device=self.device,
            extra_files=build.checkpoint_files(cfg, dataset_prefix),
            protect=self._protected_checkpoints,
            on_skip=self.recorder.checkpoint_skipped,
        )
        self.interventions = None
        if self.supervisor is not None:
            self.interventions = Interventions(
                self.supervisor, self.checkpoints, self.loader, self.optimizers, self.factors,
                self.recorder, self.control, grad_accum=self.grad_accum,
                batch_tokens=cfg.train.batch_tokens, evaluator=self.evaluator,
            )  # fmt: skip

    # ----- state -----------------------------------------------------------------------------
    def _states(self) -> dict:
        """The pieces a checkpoint holds beside the model and the optimizers."""
        states = {
            "progress": self.progress,
            "factors": self.factors,
            "loss_scaler": self.scaler,
            "data": self.loader,
        }
        if self.supervisor is not None:
            states["supervisor"] = self.supervisor
        return states

    def _protected_checkpoints(self, checkpoints: list[Path]) -> set[Path]:
        if self.interventions is None:
            return set()
        return self.interventions.protected(checkpoints, self.step)

    @property
    def step(self) -> int:
        return self.progress.step

    @property
    def tokens_seen(self) -> int:
        return self.progress.tokens_seen

    # ----- one step --------------------------------------------------------------------------
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

    def forward_backward_step(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        packed: dict[str, torch.Tensor] | None = None,
        weight: float | None = None,
    ) -> torch.Tensor:
        """Loss of one micro-batch, backpropagated with the 1/grad_accum weight.

        Fine-tuning: ``packed`` holds the rows' ``positions`` and ``segments`` (packed
        examples), and the mean over this micro-batch's answer tokens is multiplied by
        ``weight`` (:func:`answer_weight`), so that the step's gradient is that of the mean
        over every answer token of the global batch, whatever the layout."""
        kwargs = packed or {}
        if self.fused_loss:
            with self._compute_context():
                loss = self.model(inputs, targets, **kwargs)
            loss = loss if weight is None else loss * weight
            self.scaler.scale_loss(loss / self.grad_accum).backward()
            return loss.detach()
        with self._compute_context():
            logits = self.model(inputs, **kwargs)  # (B, T, V), vocab-sharded under TP
        with self._loss_context():
            loss = cross_entropy(logits, targets)
            loss = loss if weight is None else loss * weight
            self.scaler.scale_loss(loss / self.grad_accum).backward()
        return _full(loss.detach())

    def _microbatch_inputs(self, batch) -> tuple:
        """(inputs, targets, packed, weight) on the device for forward_backward_step, from
        pretraining's (inputs, targets) or fine-tuning's batch."""
        if isinstance(batch, tuple):
            inputs, targets = batch
            on = (inputs.to(self.device, non_blocking=True),
                  targets.to(self.device, non_blocking=True))  # fmt: skip
            return (*on, None, None)
        batch = batch.to(self.device, non_blocking=True)
        packed = {"positions": batch.positions, "segments": batch.segments}
        weight = batch.loss_tokens * answer_weight(batch, self.dims.dp, self.grad_accum)
        return batch.tokens, batch.targets, packed if self.cfg.finetune.packing else None, weight

    def _pipeline_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = cross_entropy(logits, targets)
        if self._pipeline_answer_weight is not None:  # fine-tuning: see forward_backward_step
            loss = loss * (targets != IGNORE_INDEX).sum() * self._pipeline_answer_weight
        return self.scaler.scale_loss(loss)

    def _run_pipeline(self, microbatches: list, run) -> list[torch.Tensor]:
        """One run of the schedule (``step`` or ``eval``) over the micro-batches: each one's
        loss on the last stage, none elsewhere."""
        pairs = [mb if isinstance(mb, tuple) else (mb.tokens, mb.targets) for mb in microbatches]
        inputs = torch.cat([i for i, _ in pairs]).to(self.device)
        targets = torch.cat([t for _, t in pairs]).to(self.device)
        args = (inputs,) if self.parallel.has_first_stage else ()
        losses: list[torch.Tensor] = []
        kwargs = {"target": targets, "losses": losses} if self.parallel.has_last_stage else {}
        with self._compute_context(), self._loss_context():
            run(*args, **kwargs)
        return losses

    def pipeline_forward_backward(self, microbatches: list) -> torch.Tensor:
        """One schedule run over all microbatches of the step; returns the mean loss on the
        last stage (zero elsewhere)."""
        losses = self._run_pipeline(microbatches, self.pp_schedule.step)
        if not losses:
            return torch.zeros((), device=self.device)
        return torch.stack([_full(x).detach().float() for x in losses]).mean() / self.scaler.scale

    def forward_losses(self, microbatches: MicroBatches) -> torch.Tensor:
        """Forward only (evaluation, under no_grad): each micro-batch's mean loss, (n,) on
        the ranks that compute the loss (empty on a pipeline's other stages)."""
        if self.pp_schedule is not None:
            losses = self._run_pipeline(microbatches, self.pp_schedule.eval)
            if not losses:
                return torch.zeros(0, device=self.device)
            return torch.stack([_full(x).float() for x in losses]) / self.scaler.scale
        losses = []
        for inputs, targets in microbatches:
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            if self.fused_loss:
                with self._compute_context():
                    loss = self.model(inputs, targets)
            else:
                with self._compute_context():
                    logits = self.model(inputs)  # (B, T, V), vocab-sharded under TP
                with self._loss_context():
                    loss = cross_entropy(logits, targets)
            losses.append(_full(loss).float())
        return torch.stack(losses)

    def validate(self) -> Evaluation | None:
        """Evaluate the held-out loss now (collective), or None without a held-out set."""
        return self.evaluator.evaluate(self.step) if self.evaluator is not None else None

    def _validated(self, evaluation: Evaluation) -> None:
        """Every evaluation, the ones after an intervention included, goes to the console,
        TensorBoard and metrics.jsonl (rank 0) and into status.json."""
        if self.metrics is not None:
            self.metrics.log_validation(evaluation)
        self.recorder.validated(evaluation.step, evaluation.loss)

    def _downstream_evaluated(self, event: DownstreamEval) -> None:
        """Every downstream evaluation to the console and TensorBoard (rank 0), the
        logbook and status.json."""
        if self.metrics is not None:
            self.metrics.log_downstream(event)
        self.recorder.downstream(event.model_copy(update={"tokens": self.tokens_seen}))

    def _validation_due(self, last: bool) -> bool:
        every = self.step % self.cfg.validation.every == 0
        return self.evaluator is not None and (every or self.checkpoints.due(self.step, last))

    def train_step(self) -> StepResult:
        for part in self.model_parts:
            part.train()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        microbatches = list(self.loader.next_microbatches(self.grad_accum))
        if self.pp_schedule is not None:
            first = microbatches[0]
            self._pipeline_answer_weight = (
                None if isinstance(first, tuple)
                else answer_weight(first, self.dims.dp, self.grad_accum)
            )  # fmt: skip
            loss = self.pipeline_forward_backward(microbatches)
        else:
            losses = [self.forward_backward_step(*self._microbatch_inputs(mb))
                      for mb in microbatches]  # fmt: skip
            loss = torch.stack(losses).mean()
        step = self.step + 1
        drill = self.supervisor.drill_at(step) if self.supervisor else None
        if drill is not None:
            loss = self._inject_drill(drill, loss)
        params = self.parallel.parameters()
        align_grad_placements(params)
        sync_tied_embedding_grads(self.parallel.tied_embeddings(), self.embed_group)
        self.scaler.unscale_(params)
        watching = self.supervisor is not None  # the operator's files go to the supervisor
        agreed = agree(
            self.shares, loss, stage_grad_norm(self.parallel.norm_parameters()),
            stop_signal=self.stop_signal is not None and self.stop_signal.received is not None,
            stop_file=watching and self.control.stop_requested(),
            intervention_waiting=watching and self.control.intervention_waiting(),
            activations=self.activations.take(),
        )  # fmt: skip
        # A non-finite norm is an fp16 overflow (or a diverged step): the update is dropped.
        # The norm and loss are agreed, so every rank decides the same.
        overflow = not math.isfinite(agreed.grad_norm)
        decision = Decision()
        if self.supervisor is not None:
            decision = self.supervisor.inspect(
                step, agreed.loss, agreed.grad_norm, overflow and self.scaler.enabled,
                self.scaler.scale, self.scaler.at_floor, agreed.stop_file,
                agreed.intervention_waiting, agreed.activation_rms,
            )  # fmt: skip
        skipped = overflow or decision.drops_update
        lr = self.schedule(self.step) * self.factors.lr_scale
        if self.supervisor is not None:
            lr *= self.supervisor.lr_multiplier(step)
        if not skipped:
            self.checkpoints.wait_until_staged()
            clip_grads_(params, self.factors.grad_clip, agreed.grad_norm)
            for optimizer in self.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.step()
        self.scaler.update(overflow=overflow)
        self.progress.step += 1
        self.progress.tokens_seen += self.cfg.train.batch_tokens
        return StepResult(
            self.step, agreed.loss, agreed.grad_norm, lr, self.scaler.scale, skipped, decision,
            agreed.stop_signal, drill, agreed.activation_rms,
        )  # fmt: skip

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

    def should_continue_training(self) -> bool:
        return self.step < self.max_steps and self.stop is None

    # ----- the loop --------------------------------------------------------------------------
    def restore(self) -> Path | None:
        """Resume per ``checkpoint.resume`` (or start from ``init_from`` weights), and finish
        a rollback that a dead job logged but never saved; returns the source."""
        source = self.checkpoints.resume()
        if source is None:
            return self.checkpoints.init_from_weights()
        if self.interventions is not None:
            self.reconciled = self.interventions.reconcile(self.step, self.tokens_seen)
        return source

    def fit(self) -> list[StepResult]:
        """Train to ``max_steps`` or an early stop, watched for hangs from the restore on."""
        resilience = self.cfg.resilience
        if resilience.hang_timeout_s > 0:
            self.watchdog = Watchdog(
                self.cfg.run_dir, self.rank, self.dims.world_size, resilience.hang_timeout_s,
                resilience.hang_grace_s,
            ).start(self.step)  # fmt: skip
        try:
            return self._fit()
        finally:
            if self.watchdog is not None:
                self.watchdog.close()
                self.watchdog = None

    def _beat(self) -> None:
        """Progress, for the hang watchdog: a step, a save, an evaluation or a restore."""
        if self.watchdog is not None:
            self.watchdog.beat(self.step)

    def _fit(self) -> list[StepResult]:
        cfg = self.cfg
        lead = self.rank == 0
        loading = time.perf_counter()
        source = self.restore()
        load_s = time.perf_counter() - loading
        self._beat()
        if source is not None and lead:
            print(f"resumed from {source} at step {self.step}", flush=True)
        # Written only once the inputs have proven loadable: a failed start leaves no run dir.
        self.recorder.started(
            step=self.step, tokens=self.tokens_seen, source=source, layout=self.job.layout,
            reconciled=self.reconciled, max_steps=self.max_steps, load_s=load_s,
        )  # fmt: skip
        metrics = self.metrics = self._metrics_logger() if lead else None
        if lead:
            print(self.validation_plan, flush=True)
            if self.cfg.data.sources is not None and self.cfg.finetune.mixture is None:
                for line in mixture_lines(self.cfg, self.loader, self.step, self.max_steps,
                                          self.grad_accum):  # fmt: skip
                    print(line, flush=True)
        self._epochs_done = self._data_epochs()
        if self.step == 0 and self.supervisor is not None and cfg.checkpoint.initial:
            self.checkpoints.save(0)  # somewhere to roll back to from a blow-up in warmup
            self._beat()
        results, tokens_since_log = [], 0
        try:
            # The curve's first point; after a resume, the last evaluation before the stop
            # (which the supervisor has seen: its state came back with the checkpoint).
            first = self.validate()
            self._beat()
            if first is not None and self.supervisor is not None and self.step == 0:
                self.supervisor.validated(0, first.loss)  # the baseline: nothing to regress from
            while self.should_continue_training():
                self._beat()  # whatever ended the last iteration (a stop's save, a window)
                maybe_inject_fault(self.rank, self.step + 1)
                result = self.train_step()
                self._beat()
                results.append(result)
                self.checkpoints.poll()
                before = (self.tokens_seen, self.factors.lr_scale, self.factors.grad_clip)
                self._act_on(result)
                self._beat()  # a rollback's load
                anomalous = not result.decision.healthy  # logged: the report shows it
                if self.stop is not None or self.step < result.step:
                    if anomalous:  # the step the run abandons, onto the report's curve
                        self._log_point(result, *before)
                    continue  # stopped, or rolled back: nothing of this step to log or save
                self._note_epochs()
                tokens_since_log += cfg.train.batch_tokens
                last = self.step == self.max_steps
                logged = self.step % cfg.metrics.log_every == 0 or last or anomalous
                if logged:
                    if metrics is not None:
                        metrics.log(self.step, tokens_since_log, _log_values(result),
                                    epochs=self.loader.source_epochs())  # fmt: skip
                    tokens_since_log = 0
                saved = self.checkpoints.due(self.step, last)
                if saved:
                    if metrics is not None:
                        metrics.pause()
                    self.checkpoints.save(self.step)
                    self._beat()
                    if metrics is not None:
                        metrics.resume()
                evaluation = None
                if self._validation_due(last):
                    # After the save: it overlaps an async save's writes.
                    evaluation = self.validate()
                    self._beat()
                if logged or evaluation is not None:  # the logbook's series: the curve it draws
                    self._log_point(result, self.tokens_seen, *self._factors(), evaluation)
                if evaluation is not None:
                    self._judge(evaluation)
                    if self.stop is not None or self.step < result.step:
                        continue  # the held-out loss regressed: stopped or rolled back
                if self.downstream is not None and self.downstream.due(self.step, saved):
                    self.downstream.evaluate(self.step)
                    self._beat()
                self.recorder.status(RUNNING, self.step, self.tokens_seen, self.max_steps,
                                     loss=result.loss)  # fmt: skip
                if result.stop_signal and self.should_continue_training():
                    self.stop = self._stop_on_signal()
                elif self.stragglers is not None and self.stragglers.due(self.step):
                    self._judge_stragglers()
            self._beat()
            self.checkpoints.close()
        except BaseException as err:
            self.recorder.failed(err, self.step, self.tokens_seen, self.max_steps)
            raise
        finally:
            if metrics is not None:
                metrics.close()
                self.metrics = None
            if isinstance(self.loader, PrefetchingLoader):
                self.loader.close()
            if self.stop_signal is not None:
                self.stop_signal.restore_defaults()
        ended = self.stop or Stop(FINISHED, "finished: reached max_steps")
        self.recorder.stopped(ended, self.step, self.tokens_seen, self.max_steps)
        return results

    def _data_epochs(self) -> dict[str, int]:
        """Whole epochs each source of a mixture (``data.sources``) has been drawn; {}
        without one."""
        if self.cfg.data.sources is None or self.cfg.finetune.mixture is not None:
            return {}
        return {name: math.floor(e) for name, e in self.loader.source_epochs().items()}

    def _note_epochs(self) -> None:
        """Log every source drawn one more time over since the last step into the logbook
        (a rollback lowers the counts; drawing past them again logs again)."""
        done = self._data_epochs()
        if not done:
            return
        sizes = {s.name: s.num_samples for s in self.loader.stream.sources}
        for name, epochs in done.items():
            if epochs > self._epochs_done.get(name, 0):
                self.recorder.data_epoch(name, epochs, sizes[name], self.step, self.tokens_seen)
        self._epochs_done = done

    def _act_on(self, result: StepResult) -> None:
        """Carry out the supervisor's decision for the step just taken."""
        decision = result.decision
        if self.interventions is None:
            return
        if decision.manual:  # first, so that a stop's checkpoint includes it
            self.interventions.apply_manual(self.step, self.tokens_seen)
        self._carry_out(decision, result.step, drill=result.drill is not None)

    def _carry_out(self, decision: Decision, step: int, drill: bool = False) -> None:
        """Log an incident's verdict if one is due, then carry out an unhealthy decision
        (of a step, or of the evaluation after it) and say so on the console."""
        self.interventions.judged(step, self.tokens_seen)
        if decision.healthy:
            return
        self.stop = self.interventions.carry_out(decision, step, self.tokens_seen, drill=drill)
        if self.rank == 0:
            cause = decision.anomaly.detector if decision.anomaly else decision.reason
            print(f"supervisor: step {step}: {decision.rung or 'stop'} ({cause})", flush=True)

    def _factors(self) -> tuple[float, float]:
        return self.factors.lr_scale, self.factors.grad_clip

    def _log_point(
        self, result: StepResult, tokens: int, lr_scale: float, grad_clip: float,
        evaluation: Evaluation | None = None,
    ) -> None:  # fmt: skip
        """A point of the logbook's series: a logged, validated or anomalous step."""
        self.recorder.logged(
            step=result.step, tokens=tokens, loss=result.loss, lr=result.lr,
            lr_scale=lr_scale, grad_clip=grad_clip, loss_scale=result.loss_scale,
            val_loss=evaluation.loss if evaluation is not None else None,
        )  # fmt: skip

    def _judge(self, evaluation: Evaluation) -> None:
        """The supervisor's decision on an evaluation of the training loop (every rank holds
        the same reduced loss, so every rank decides alike): it judges an incident's
        recovery and watches for a regression of the held-out loss."""
        if self.supervisor is None:
            return
        self._carry_out(
            self.supervisor.validated(evaluation.step, evaluation.loss), evaluation.step
        )

    def _save_for_stop(self) -> tuple[str, float]:
        """A synchronous checkpoint of this step (unless one was just saved) for the
        requeue that follows a stop; returns its name and the seconds it took."""
        saving = time.perf_counter()
        if self.checkpoints.last_saved_step != self.step or self.checkpoints.in_flight:
            self.checkpoints.save(self.step, sync=True)
        took = time.perf_counter() - saving
        return checkpoint_path(self.cfg.checkpoint_dir, self.step).name, took

    def _stop_on_signal(self) -> Stop:
        """The scheduler's warning: a checkpoint, then a clean exit that the launcher
        requeues."""
        saved, took = self._save_for_stop()
        received = (self.stop_signal.received if self.stop_signal else None) or "a peer's signal"
        return Stop(
            STOPPED_ON_SIGNAL,
            f"stopped on {received} at step {self.step}, checkpoint {saved} saved for the "
            f"requeue in {took:.2f} s",
        )

    def _judge_stragglers(self) -> None:
        """The end of a straggler window (collective): every rank's figure agreed, each
        newly persistent straggler named in the logbook, and the run stopped once one has
        been slow for ``straggler_requeue_after`` windows in a row."""
        verdict = self.stragglers.window()
        hosts, every = self.stragglers.hosts, self.stragglers.every
        self.recorder.straggler_window(self.step, verdict.figures, verdict.median,
                                       [s.rank for s in verdict.slow])  # fmt: skip
        for slow in verdict.named:
            self.recorder.straggler(
                StragglerDetected(
                    step=self.step, tokens=self.tokens_seen, rank=slow.rank,
                    host=hosts[slow.rank], seconds_per_block=slow.seconds_per_block,
                    median_seconds_per_block=verdict.median, ratio=slow.ratio,
                    windows=slow.windows, every=every,
                )
            )  # fmt: skip
        if verdict.requeue and self.should_continue_training():
            self.stop = self._stop_for_stragglers(verdict.requeue)

    def _stop_for_stragglers(self, slow: list[Slow]) -> Stop:
        """A checkpoint, then a clean exit whose status names the slow hosts, for the
        launcher to requeue without them."""
        saved, _ = self._save_for_stop()
        hosts = self.stragglers.hosts
        who = "; ".join(
            f"rank {s.rank} on {hosts[s.rank]}, {s.ratio:.2f}x the median for {s.windows} "
            f"windows of {self.stragglers.every} steps"
            for s in slow
        )
        slow_hosts = sorted({hosts[s.rank] for s in slow})
        return Stop(
            STOPPED_STRAGGLER,
            f"stopped for a straggler at step {self.step} ({who}), checkpoint {saved} saved "
            f"for a requeue without {', '.join(slow_hosts)}",
            hosts=slow_hosts,
            ranks=sorted(s.rank for s in slow),
        )

    def _metrics_logger(self) -> MetricsLogger:
        cfg = self.cfg
        if cfg.metrics.peak_tflops is not None:
            peak = cfg.metrics.peak_tflops * 1e12
        else:
            dtype = AUTOCAST_DTYPES.get(cfg.train.precision, torch.float32)
            peak = mfu_peak(dtype, self.device, bf16_via_fp32=self.bf16_via_fp32)
        tb_dir = cfg.run_dir / "tensorboard" if cfg.metrics.tensorboard else None
        # Tokens are counted globally, so per-device MFU divides the work over every rank.
        flops = training_flops_per_token(self.model_args, cfg.data.seq_len)
        flops /= self.dims.world_size
        return MetricsLogger(tb_dir, flops, peak, jsonl=cfg.run_dir / "metrics.jsonl")


def _log_values(result: StepResult) -> dict[str, float]:
    return {
        "loss": result.loss,
        "grad_norm": result.grad_norm,
        "lr": result.lr,
        "loss_scale": result.loss_scale,
        "activation_rms": result.activation_rms,
    }
