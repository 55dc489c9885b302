"""The training loop: small step methods and a ``state_dict`` a supervisor can hook into."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from opt import checkpoint as ckpt
from opt.checkpoint.checkpointer import checkpoint_path
from opt.config import JobConfig, to_toml
from opt.errors import OptError
from opt.models.model import build_model
from opt.models.sizes import ModelArgs, get_model_args
from opt.train.data_setup import build_loader, resolve_tokenizer_file
from opt.train.flops import measure_matmul_peak, training_flops_per_token
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


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss, computed in fp32 whatever the autocast dtype."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def resolve_model_args(cfg: JobConfig) -> ModelArgs:
    args = get_model_args(cfg.model.name)
    custom = {
        key: getattr(cfg.model, key)
        for key in ("n_layers", "n_heads", "d_model", "vocab_size")
        if getattr(cfg.model, key) > 0
    }
    if "d_model" in custom:
        custom["ffn_dim"] = 4 * custom["d_model"]
        if not args.projects_embeddings:
            custom["word_embed_dim"] = custom["d_model"]
    if cfg.model.dropout >= 0:
        custom["dropout"] = cfg.model.dropout
    if custom:
        args = args.replace(**custom)  # re-validates the shape, e.g. heads dividing d_model
    if cfg.data.seq_len > args.max_positions:
        raise OptError(
            f"data.seq_len={cfg.data.seq_len} exceeds {cfg.model.name}'s "
            f"max_positions={args.max_positions}"
        )
    return args


def gradient_accumulation_steps(cfg: JobConfig, dp_size: int = 1) -> int:
    per_pass = cfg.train.micro_batch_size * cfg.data.seq_len * dp_size
    if cfg.train.batch_tokens % per_pass != 0:
        raise OptError(
            f"train.batch_tokens={cfg.train.batch_tokens} is not a multiple of "
            f"micro_batch_size * seq_len * dp = {per_pass}"
        )
    return cfg.train.batch_tokens // per_pass


class Trainer:
    """Owns model, optimizer, schedule, loss scaler, data stream and checkpoints of one run."""

    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self.model_args = resolve_model_args(cfg)
        self.grad_accum = gradient_accumulation_steps(cfg)
        self.device = _resolve_device(cfg.train.device)
        bf16_on_gpu = cfg.train.precision == "bf16" and self.device.type == "cuda"
        if bf16_on_gpu and not torch.cuda.is_bf16_supported():
            raise OptError("train.precision=bf16 needs a GPU with bf16 support")
        # Everything fallible about the data happens before the model is allocated.
        self.loader, self.dataset_prefix = build_loader(cfg, self.model_args)

        torch.manual_seed(cfg.run.seed)
        self.model = build_model(self.model_args, self.device)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.schedule = LinearWarmupDecay(cfg.optim.lr, cfg.schedule, cfg.train.batch_tokens)
        self.scaler = DynamicLossScaler(cfg.loss_scale, enabled=cfg.train.precision == "fp16")
        self.max_steps = cfg.train.max_steps or max(
            1, cfg.schedule.decay_tokens // cfg.train.batch_tokens
        )
        self.step = 0
        self.tokens_seen = 0
        # Multipliers the divergence supervisor lowers; checkpointed so they survive restarts.
        self.lr_scale = 1.0
        self.grad_clip = cfg.optim.grad_clip
        self.stop_requested = False

    # ----- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "lr_scale": self.lr_scale,
            "grad_clip": self.grad_clip,
            "loss_scaler": self.scaler.state_dict(),
            "data": self.loader.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.lr_scale = float(state["lr_scale"])
        self.grad_clip = float(state["grad_clip"])
        self.scaler.load_state_dict(state["loss_scaler"])
        self.loader.load_state_dict(state["data"])

    # ----- one step ------------------------------------------------------------------------
    def forward_backward_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss of one micro-batch, backpropagated with the 1/grad_accum weight."""
        with autocast(self.cfg.train.precision, self.device):
            logits = self.model(inputs)  # (B, T, V)
        loss = cross_entropy(logits, targets)
        self.scaler.scale_loss(loss / self.grad_accum).backward()
        return loss.detach()

    def train_step(self) -> StepResult:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        for inputs, targets in self.loader.next_microbatches(self.grad_accum):
            inputs = inputs.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            losses.append(self.forward_backward_step(inputs, targets))
        params = [p for p in self.model.parameters() if p.grad is not None]
        self.scaler.unscale_(params)
        max_norm = self.grad_clip if self.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))
        # A non-finite norm means an fp16 overflow (or a diverged step): drop the update.
        skipped = not math.isfinite(grad_norm)
        lr = self.schedule(self.step) * self.lr_scale
        if not skipped:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        self.scaler.update(overflow=skipped)
        self.step += 1
        self.tokens_seen += self.cfg.train.batch_tokens
        loss = float(torch.stack(losses).mean())
        return StepResult(self.step, loss, grad_norm, lr, self.scaler.scale, skipped)

    def should_continue_training(self) -> bool:
        return self.step < self.max_steps and not self.stop_requested

    # ----- checkpoints ---------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        extra = {"config.toml": to_toml(self.cfg).encode()}
        tokenizer = resolve_tokenizer_file(self.cfg, self.dataset_prefix)
        if tokenizer is not None:
            extra["tokenizer.json"] = tokenizer.read_bytes()
        path = ckpt.save_checkpoint(
            checkpoint_path(self.cfg.checkpoint_dir, self.step),
            model=self.model,
            model_args=self.model_args,
            optimizer=self.optimizer,
            trainer_state=self.state_dict(),
            extra_files=extra,
        )
        ckpt.prune_checkpoints(self.cfg.checkpoint_dir, self.cfg.checkpoint.keep_last)
        return path

    def restore(self) -> Path | None:
        """Resume per ``checkpoint.resume``, or start from ``init_from`` weights; returns the source."""
        source = self._resume_source()
        if source is not None:
            self._check_same_shape(source)
            self.load_state_dict(ckpt.load_training_state(source, self.model, self.optimizer))
            return source
        if self.cfg.checkpoint.init_from:
            source = Path(self.cfg.checkpoint.init_from)
            self._check_same_shape(source)
            ckpt.load_model_weights(source, self.model)
            return source
        return None

    def _resume_source(self) -> Path | None:
        resume = self.cfg.checkpoint.resume
        if resume == "none":
            return None
        if resume == "auto":
            return ckpt.latest_checkpoint(self.cfg.checkpoint_dir)
        return Path(resume)

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
        if source is not None:
            print(f"resumed from {source} at step {self.step}", flush=True)
        # Written only once the inputs have proven loadable: a failed start leaves no run dir.
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        (cfg.run_dir / "config.toml").write_text(to_toml(cfg))
        metrics = self._metrics_logger()
        results, tokens_since_log = [], 0
        try:
            while self.should_continue_training():
                result = self.train_step()
                results.append(result)
                tokens_since_log += cfg.train.batch_tokens
                if self.step % cfg.metrics.log_every == 0 or self.step == self.max_steps:
                    metrics.log(self.step, tokens_since_log, _log_values(result))
                    tokens_since_log = 0
                if self.step % cfg.checkpoint.every == 0 or self.step == self.max_steps:
                    metrics.pause()
                    self.save_checkpoint()
                    metrics.resume()
        finally:
            metrics.close()
        return results

    def _metrics_logger(self) -> MetricsLogger:
        cfg = self.cfg
        peak = cfg.metrics.peak_tflops * 1e12
        if peak <= 0:
            dtype = AUTOCAST_DTYPES.get(cfg.train.precision, torch.float32)
            peak = measure_matmul_peak(dtype, self.device)
        tb_dir = cfg.run_dir / "tensorboard" if cfg.metrics.tensorboard else None
        flops = training_flops_per_token(self.model_args, cfg.data.seq_len)
        return MetricsLogger(tb_dir, flops, peak)


def _log_values(result: StepResult) -> dict[str, float]:
    return {
        "loss": result.loss,
        "grad_norm": result.grad_norm,
        "lr": result.lr,
        "loss_scale": result.loss_scale,
    }


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise OptError("train.device=cuda but no CUDA device is available")
    return torch.device(name)
