"""The run configuration: one typed tree (pydantic v2), loaded from TOML, then overrides.

Precedence, lowest to highest: the defaults below, the TOML file, ``values`` handed in by a
program (``load_config(..., values=...)``, ``JobConfig.with_overrides``), and the
``--section.key value`` overrides of the command line. The resolved tree is written to the
run directory as ``config.toml`` (``to_toml``) so that a run can always be reproduced from
what it saved.

A field that is derived, or left to someone else's default, when it is not set is
``Optional``: None means "not set". TOML has no null, so a key left out (or set to an
empty string) is None, and ``to_toml`` leaves None fields out.

Values keep their TOML types (strict mode) with the three conversions a TOML user expects:
an integer where a float is wanted, an integral float where an integer is (``3e8`` tokens)
and an integer where a string is (``--slurm.mem 0``). Bad input becomes one ``OptError``
line naming the key.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, get_args

import tomli_w
import tomllib
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from opt.errors import OptError

# ----- the choices, declared once -----------------------------------------------------------
Precision = Literal["fp32", "bf16", "fp16"]
Device = Literal["auto", "cpu", "cuda"]
Compile = Literal["auto", "on", "off"]
Attention = Literal["auto", "flash", "efficient", "cudnn", "math"]
CpuBf16Compute = Literal["auto", "native", "fp32"]
PpSchedule = Literal["1f1b", "interleaved_1f1b", "gpipe"]
ActivationCheckpoint = Literal["none", "full", "selective"]
LadderMove = Literal["skip", "rollback", "lower_lr_clip", "skip_data", "reset_optimizer", "stop"]
DrillKind = Literal["spike", "nan", "scale_collapse"]
SlurmSignal = Literal["USR1", "USR2"]
BuiltinCorpus = Literal["pydoc"]

PRECISIONS = get_args(Precision)
DEVICES = get_args(Device)
COMPILE = get_args(Compile)
ATTENTION = get_args(Attention)
CPU_BF16_COMPUTE = get_args(CpuBf16Compute)
PP_SCHEDULES = get_args(PpSchedule)
ACTIVATION_CHECKPOINT = get_args(ActivationCheckpoint)
LADDER_MOVES = get_args(LadderMove)
DRILL_KINDS = get_args(DrillKind)
BUILTIN_CORPORA = get_args(BuiltinCorpus)
# supervisor.drill: KIND@STEP[xN][!]; the supervisor parses it with this too.
DRILL = re.compile(rf"^({'|'.join(DRILL_KINDS)})@(\d+)(?:x(\d+))?(!?)$")
# Moves of a ladder rung that act on a rolled-back state.
_NEEDS_ROLLBACK = ("lower_lr_clip", "skip_data", "reset_optimizer")


class Section(BaseModel):
    """One ``[section]`` of the file: unknown keys refused, types strict, assignments checked."""

    model_config = ConfigDict(
        extra="forbid", strict=True, validate_assignment=True, use_attribute_docstrings=True
    )

    @field_validator("*", mode="before")
    @classmethod
    def _from_toml(cls, value: object, info: ValidationInfo) -> object:
        optional, kind = _scalar_type(cls.model_fields[info.field_name].annotation)
        if optional and isinstance(value, str) and value == "":
            return None  # TOML has no null: an empty string unsets an Optional field
        if kind is int and isinstance(value, float) and value.is_integer():
            return int(value)  # 3e8 in TOML is a float; token counts are ints
        if kind is str and type(value) is int:
            return str(value)  # `--slurm.mem 0`: a number on the command line, a string to sbatch
        return value


class RunConfig(Section):
    name: str = "run"
    """Run name: names the run directory, the checkpoint directory and the logbook."""
    dir: str = "runs"
    """Root of run directories; this run writes config and TensorBoard logs to dir/name."""
    seed: int = 0
    """Seed for weight init, dropout and data order."""


class ModelConfig(Section):
    name: str = "opt-125m"
    """Size from the table in opt/models/sizes.py (see `opt configs`)."""
    dropout: float | None = Field(None, ge=0, le=1)
    """Dropout on attention and FFN outputs; not set keeps the size's value (0.1)."""
    n_layers: int | None = Field(None, gt=0)
    """Custom shape: the layer count (not set keeps the size's)."""
    n_heads: int | None = Field(None, gt=0)
    """Custom shape: the head count (not set keeps the size's)."""
    d_model: int | None = Field(None, gt=0)
    """Custom shape: the width (not set keeps the size's; ffn_dim follows as 4x)."""
    vocab_size: int | None = Field(None, gt=0)
    """Custom shape: the vocabulary size (not set keeps the size's)."""


class DataSource(Section):
    """One dataset of a weighted mixture (``[[data.sources]]``)."""

    path: str
    """Prefix of its token files, written by `opt data prepare`; its held-out set, if it
    has one, is <path>-valid."""
    name: str | None = None
    """Its name in metrics, logs and the logbook; not set: the prefix's last part, or, for
    a prefix ending in /train (`opt data prepare --out DIR/train`), DIR's name."""
    weight: float | None = Field(None, gt=0)
    """Its share of the samples, relative to the others' weights (0.3 and 0.7, or 3 and 7)."""
    tokens: int | None = Field(None, gt=0)
    """Instead of a weight: the tokens to draw from it over the run; the shares are these
    counts' ratios (epochs = tokens over its size)."""

    @property
    def label(self) -> str:
        if self.name is not None:
            return self.name
        path = Path(self.path)
        return path.parent.name if path.name == "train" and path.parent.name else path.name

    @model_validator(mode="after")
    def _one_share(self) -> DataSource:
        if (self.weight is None) == (self.tokens is None):
            raise ValueError(f"source {self.label!r}: give weight or tokens (one of them)")
        return self


class DataConfig(Section):
    path: str | None = None
    """Prefix of the token files written by `opt data prepare` (PREFIX.bin/.idx/.json)."""
    sources: list[DataSource] | None = None
    """Instead of path: several prepared datasets drawn in proportion, each a
    ``[[data.sources]]`` table with path and weight (or tokens); validation reads each one's
    <path>-valid and reports a loss per source."""
    builtin: BuiltinCorpus | None = None
    """'pydoc' builds the embedded CPython-docs corpus at `path` when it is missing."""
    tokenizer: str | None = None
    """Tokenizer file or directory; not set means tokenizer.json beside the token files."""
    seq_len: int = Field(2048, gt=0)
    """Tokens per training sequence."""
    shuffle: bool = True
    """A fresh seeded permutation of the samples every epoch; off reads them in file order
    (a dataset shuffled offline, or a curriculum)."""
    prefetch: bool = True
    """Build the next step's batches in a background thread while this step computes."""
    pin_memory: bool = True
    """On GPUs, stage batches in page-locked host memory so the copy to the device is async."""

    @model_validator(mode="after")
    def _one_kind_of_data(self) -> DataConfig:
        if self.sources is None:
            return self
        if self.path is not None or self.builtin is not None:
            raise ValueError("data.sources replaces data.path and data.builtin: set one")
        if not self.sources:
            raise ValueError("data.sources is empty")
        labels = [s.label for s in self.sources]
        if len(set(labels)) != len(labels):
            raise ValueError(f"data.sources need distinct names (set name), not {labels}")
        if len({s.weight is None for s in self.sources}) > 1:
            raise ValueError("data.sources: give every source a weight, or every one tokens")
        return self


class OptimConfig(Section):
    lr: float = Field(6e-4, gt=0)
    """Peak learning rate."""
    betas: list[float] = [0.9, 0.95]
    """AdamW betas (OPT: 0.9, 0.95)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices and embeddings but not biases or norms."""
    grad_clip: float = 1.0
    """Clip the global L2 gradient norm to this; 0 disables clipping."""
    fused: bool = True
    """Use torch's fused AdamW kernel."""

    @field_validator("betas")
    @classmethod
    def _two_betas(cls, betas: list[float]) -> list[float]:
        if len(betas) != 2:
            raise ValueError(f"must have two values, got {betas}")
        return betas


class ScheduleConfig(Section):
    warmup_tokens: int = 375_000_000
    """Linear warmup length in tokens (OPT: 375M; 175B used 2000 steps)."""
    decay_tokens: int = Field(300_000_000_000, gt=0)
    """Tokens over which the LR decays linearly to min_lr_ratio * lr (OPT: 300B)."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Final LR as a fraction of the peak."""


class TrainConfig(Section):
    batch_tokens: int = Field(524_288, gt=0)
    """Global batch in tokens; must equal micro_batch_size * seq_len * grad_accum * dp."""
    micro_batch_size: int = Field(8, gt=0)
    """Sequences per forward/backward on each data-parallel rank."""
    max_steps: int | None = Field(None, gt=0)
    """Stop after this many optimizer steps; not set means decay_tokens / batch_tokens."""
    precision: Precision = "fp32"
    """fp32, bf16 (autocast) or fp16 (autocast with dynamic loss scaling, OPT's setting)."""
    device: Device = "auto"
    """cpu, cuda or auto (cuda when available)."""
    compile: Compile = "auto"
    """torch.compile each block: on, off, or auto (on for GPUs; off on CPUs, where inductor's
    blocks measured slower than eager ones)."""
    attention: Attention = "auto"
    """SDPA kernel: auto (PyTorch picks: flash on GPUs for bf16/fp16), flash, efficient,
    cudnn or math. flash is also the fused CPU kernel; efficient and cudnn need a GPU."""
    loss_chunk: int = Field(4096, ge=0)
    """Fused head + cross-entropy over chunks of this many tokens, never holding the whole
    batch's logits; 0 builds the full logits (always so under tp > 1 or pp > 1, where the
    loss is vocab-parallel or runs in the pipeline's last stage)."""
    cpu_bf16_compute: CpuBf16Compute = "auto"
    """bf16 matmuls and attention on a CPU: native kernels, fp32 (exact fp32 copies of the
    bf16 operands, result rounded to bf16), or auto (fp32 on CPUs without AVX-512 BF16/AMX)."""
    keep_host_memory: bool = True
    """Keep freed host memory for reuse instead of returning it to the kernel and faulting
    it back in every step (glibc; see opt/host_memory.py)."""


class ParallelConfig(Section):
    dp_replicate: int = 1
    """Data-parallel replicas (HSDP: replicate across nodes, shard within)."""
    dp_shard: int = -1
    """FSDP2 (ZeRO-3) shard degree; -1 takes what the other degrees leave of the world."""
    tp: int = 1
    """Tensor-parallel degree (Megatron split; keep within a node)."""
    pp: int = 1
    """Pipeline-parallel degree."""
    pp_schedule: PpSchedule = "1f1b"
    """1f1b, interleaved_1f1b (virtual stages) or gpipe; microbatches = micro_batch_size groups."""
    pp_stages_per_rank: int = Field(1, ge=1)
    """Virtual pipeline stages per rank; interleaved_1f1b needs at least 2."""
    sequence_parallel: bool = False
    """Shard LayerNorm and dropout regions by sequence across the TP group (needs tp > 1)."""
    activation_checkpoint: ActivationCheckpoint = "none"
    """none, full (recompute every block) or selective (keep matmul/attention outputs)."""
    timeout_s: float = Field(600.0, gt=0)
    """A collective that waits longer than this fails instead of hanging the job."""
    fsdp_mixed_precision: bool = True
    """Under bf16, FSDP gathers block parameters in bf16 and reduces gradients in fp32;
    the sharded fp32 master weights and optimizer state are unchanged."""

    @model_validator(mode="after")
    def _stages_fit_the_schedule(self) -> ParallelConfig:
        interleaved = self.pp_schedule == "interleaved_1f1b"
        if interleaved and self.pp_stages_per_rank < 2:
            raise ValueError("parallel.pp_schedule=interleaved_1f1b needs pp_stages_per_rank >= 2")
        if not interleaved and self.pp_stages_per_rank != 1:
            raise ValueError(f"parallel.pp_schedule={self.pp_schedule} runs one stage per rank")
        if self.sequence_parallel and self.tp < 2:
            raise ValueError("parallel.sequence_parallel needs parallel.tp > 1")
        return self


class SupervisorConfig(Section):
    enabled: bool = True
    """Watch every step for divergence and act by the ladder below."""
    window: int = Field(50, ge=1)
    """Healthy steps of loss and grad-norm history the robust statistics use."""
    min_steps: int = Field(20, ge=1)
    """Healthy steps seen before the spike and grad-norm detectors arm."""
    spike_z: float = 6.0
    """A loss more than this many robust standard deviations (1.4826 MAD) above the median is a spike."""
    spike_min_rise: float = 0.05
    """...and at least this much above the median (absolute), so flat curves cannot trip it."""
    grad_norm_factor: float = 10.0
    """A grad norm above this multiple of its running median is an explosion; 0 disables."""
    norm_min_steps: int = Field(5, ge=1)
    """Healthy steps seen before the grad-norm detector arms (a blow-up in warmup is common)."""
    activation_factor: float = Field(4.0, ge=0)
    """An early warning: the root mean square of the last block's output above this multiple
    of its median over the last `activation_window` healthy steps, armed after `min_steps`
    of them and measured afresh after a rollback (0: off)."""
    activation_window: int = Field(10, ge=1)
    """Steps in that median: a few, because healthy runs grow their activations for
    thousands of steps (several times over within a few dozen early on)."""
    blowup_factor: float = Field(1.2, ge=0)
    """From the first step: a loss above this multiple of ln(vocab) (the loss of predicting
    uniformly, where training starts) is a blow-up; 0 disables."""
    trend_window: int = Field(50, ge=2)
    """Healthy steps whose median loss the slow-divergence detector follows."""
    valid_rise: float = Field(0.05, ge=0)
    """A validation loss this fraction above the best one so far is a regression (it rolls
    back to a checkpoint from before the best evaluation); 0 disables."""
    trend_rise: float = Field(0.03, ge=0)
    """The median of the last `trend_window` losses this fraction above the best such median
    is a slow divergence (each step looks healthy, the curve does not); 0 disables."""
    scale_collapses: int = 5
    """fp16 overflows within `window` steps that count as a loss-scale collapse (floor counts always)."""
    ladder: list[str] = [
        "skip",
        "rollback+lower_lr_clip",
        "rollback+lower_lr_clip+skip_data",
        "rollback+lower_lr_clip+reset_optimizer",
        "rollback+lower_lr_clip+skip_data",
    ]
    """Escalation, one rung per anomaly of an incident, the last repeating until
    `max_interventions` stops the run; moves joined by '+': skip, rollback, lower_lr_clip,
    skip_data, reset_optimizer, stop."""
    lr_factor: float = Field(0.5, gt=0, le=1)
    """lower_lr_clip multiplies the LR scale by this. OPT's team lowered it by 10%, then to
    2/3, by hand; on the divergence suite (BENCHMARKS.md) 0.9 used the interventions up
    before the LR-too-high run trained, halving repaired it."""
    clip_factor: float = Field(0.6, gt=0, le=1)
    """lower_lr_clip multiplies the clip threshold by this (OPT: 2.5 -> 1.5 -> 1.0)."""
    healthy_margin: int = 5
    """A rollback target must be saved at least this many steps before the incident began."""
    skip_data_steps: int = 10
    """skip_data drops the samples of this many steps up to the anomaly (it included)."""
    skip_data_ahead: int = Field(20, ge=0)
    """... and of this many steps after it: bad documents come in blocks (a crawl shard)."""
    rewarmup_steps: int = 20
    """reset_optimizer zeroes Adam's moments and re-warms the LR from 0 over this many steps."""
    recovery_steps: int = Field(20, ge=1)
    """Healthy steps after an intervention before its outcome is judged and the ladder resets."""
    max_interventions: int = Field(10, ge=1)
    """More interventions than this within `intervention_window` steps stops the run."""
    intervention_window: int = Field(1000, ge=1)
    """Window (steps) for max_interventions."""
    drill: str | None = None
    """Fault drill: KIND@STEP[xN][!] with KIND spike, nan or scale_collapse; xN lasts N steps;
    ! repeats it every time STEP is reached again (persistent divergence)."""

    @field_validator("ladder")
    @classmethod
    def _rungs_are_moves(cls, ladder: list[str]) -> list[str]:
        if not ladder:
            raise ValueError("must have at least one rung (e.g. ['stop'])")
        for rung in ladder:
            moves = rung.split("+")
            unknown = [m for m in moves if m not in LADDER_MOVES]
            if unknown:
                raise ValueError(
                    f"rung {rung!r}: unknown move {unknown[0]!r} (moves: {', '.join(LADDER_MOVES)})"
                )
            needs_rollback = [m for m in _NEEDS_ROLLBACK if m in moves]
            if needs_rollback and "rollback" not in moves:
                raise ValueError(f"rung {rung!r}: {sorted(needs_rollback)[0]} needs rollback")
        return ladder

    @field_validator("drill")
    @classmethod
    def _drill_parses(cls, drill: str | None) -> str | None:
        if drill is not None and not DRILL.match(drill):
            raise ValueError(
                f"must be KIND@STEP[xN][!] with KIND one of {', '.join(DRILL_KINDS)} "
                f"(e.g. spike@30x2), got {drill!r}"
            )
        return drill


class LogbookConfig(Section):
    dir: str = "logbook"
    """Root of the public logbooks; this run writes dir/<run.name>/."""
    pue: float = 1.1
    """Data-centre power usage effectiveness, for the CO2e in run_stop events."""
    carbon_intensity: float = 0.231
    """kg CO2e per kWh of the grid, for the CO2e in run_stop events."""


class LossScaleConfig(Section):
    init_scale: float = 2.0**15
    """Starting fp16 loss scale."""
    growth_interval: int = 1000
    """Double the scale after this many steps without overflow."""
    min_scale: float = 2.0**-5
    """The floor; the supervisor treats reaching it as a divergence signal."""


class CheckpointConfig(Section):
    dir: str = "checkpoints"
    """Root of checkpoint directories; this run writes dir/<run.name>/step_NNNNNNNN."""
    every: int = Field(1000, gt=0)
    """Save every this many steps (and at the end of training)."""
    keep_last: int = Field(3, ge=0)
    """Keep this many newest checkpoints; 0 keeps all."""
    initial: bool = True
    """With the supervisor on, save step 0 of a fresh run: a blow-up in the first steps (in
    warmup, the common case) then has a healthy checkpoint to roll back to."""
    resume: str = "auto"
    """auto (newest complete checkpoint, if any), none, or a checkpoint directory."""
    init_from: str | None = None
    """Start a fresh run from the weights of this checkpoint (e.g. `opt convert from-hf`)."""
    async_save: bool = True
    """Write checkpoints in the background; the manifest commits once every shard is on disk.
    Saves for a stop (signal, supervisor) are synchronous whatever this says."""
    async_staging: bool = True
    """With async_save: copy the tensors to host memory in a background thread too, waiting
    for the copy only before the next optimizer step. The host buffers are kept for the run
    (pinned on a GPU): the size of each rank's model and optimizer state. Off: the copy is
    made inside the save call, into buffers freed after the write."""


class ValidationConfig(Section):
    enabled: bool = True
    """Evaluate the loss on a held-out set while training (validation loss and perplexity)."""
    path: str | None = None
    """Prefix of the held-out token files; not set: <data.path>-valid, the held-out split
    `opt data prepare --valid-fraction` writes, and no validation when there is none (or it
    holds less than one global batch)."""
    every: int = Field(1000, gt=0)
    """Evaluate every this many steps; also at every checkpoint save and when a run starts."""
    tokens: int | None = Field(None, gt=0)
    """Held-out tokens one evaluation reads, in whole global batches of train.batch_tokens
    (rounded down, at least one): the first ones of the held-out set, the same each time;
    not set: all of it."""


class DownstreamConfig(Section):
    """Downstream accuracy in the training loop: `opt eval`'s rank classification on a few
    tasks (every prompt, the T0 view), of the weights being trained. Not the held-out loss
    (that is [validation])."""

    tasks: list[str] = []
    """Tasks to evaluate (`opt eval --tasks` names: rte, cb, copa, wic, wsc); empty: off."""
    data: str | None = None
    """Folder holding <task>/<split>.jsonl (or a saved dataset) per task, as `opt eval
    --data`; needed when tasks are set, checked when the job starts."""
    split: str = "validation"
    """The split scored."""
    every_steps: int = Field(0, ge=0)
    """Evaluate every this many steps; 0: only at checkpoints (with at_checkpoints)."""
    at_checkpoints: bool = True
    """Evaluate after every checkpoint save."""
    prompts: str = "all"
    """"all" (every original-task template), or comma-separated template names of a single
    task, as `opt eval --prompts`."""
    shots: int = Field(0, ge=0)
    """Demonstrations before each scored input, drawn from the train split."""
    limit: int | None = Field(64, gt=0)
    """Examples per task (the first ones of the split, the same each time); not set: all."""
    batch_size: int = Field(16, gt=0)
    """Sequences per forward."""

    @model_validator(mode="after")
    def _coherent(self) -> DownstreamConfig:
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"downstream.tasks names a task twice: {self.tasks}")
        if self.tasks and self.data is None:
            raise ValueError("downstream.tasks needs downstream.data (the task data folder)")
        if self.tasks and not self.every_steps and not self.at_checkpoints:
            raise ValueError(
                "downstream.tasks set but never evaluated: set downstream.every_steps or "
                "downstream.at_checkpoints"
            )
        if self.prompts != "all" and len(self.tasks) > 1:
            raise ValueError("downstream.prompts names templates of one task; give one task")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.tasks)


class FinetuneConfig(Section):
    """Multitask prompted fine-tuning (T0): train on a prompted mixture (`opt.finetune`)
    instead of token files, the loss on the answers only. Start from pretrained weights
    with checkpoint.init_from."""

    mixture: str | None = None
    """The mixture file (TOML: datasets, their PromptSource templates and task clusters, the
    held-out clusters); not set: pretraining on data.path."""
    packing: bool = True
    """Pack whole examples into each row, attention kept inside each example (positions
    restart, segment masks); false: one example per row, padded. Packing needs
    parallel.pp = 1 (a pipeline passes only hidden states between its stages)."""
    survey: bool = True
    """At job start, tokenize every example under every template it renders with: an answer
    too long for data.seq_len fails there, not at the step that reaches it."""


class MetricsConfig(Section):
    log_every: int = Field(10, gt=0)
    """Console and TensorBoard logging interval in steps."""
    tensorboard: bool = True
    """Write TensorBoard event files to <run dir>/tensorboard."""
    peak_tflops: float | None = Field(None, gt=0)
    """Per-device peak for MFU in the training dtype. Not set: a known GPU's datasheet dense
    peak under bf16/fp16, otherwise a matmul measured at start (CPUs, fp32)."""


class ResilienceConfig(Section):
    straggler_every: int = Field(50, ge=0)
    """Steps per straggler window: every rank's mean seconds per block forward (its own
    compute, not the step time, which synchronous data parallelism makes equal) is agreed
    at the end of each; 0 turns detection off (it is off anyway on one rank)."""
    straggler_factor: float = Field(1.5, gt=1)
    """A rank is slow in a window when its figure is at least this many times the median
    of all ranks' (with two ranks the median is their mean: the slow one is 3x the other)."""
    straggler_patience: int = Field(3, ge=1)
    """Consecutive slow windows before the rank is named in the logbook (once per streak)."""
    straggler_requeue_after: int = Field(0, ge=0)
    """Consecutive slow windows after which every rank stops at the same step, saves a
    checkpoint and exits cleanly (status stopped_straggler, naming the hosts) so that the
    launcher requeues without that node; 0: never."""
    hang_timeout_s: float = Field(300.0, ge=0)
    """A rank that makes no progress (no step, save, evaluation or restore finished) for
    this long writes its stack under <run dir>/hangs/ and exits with status 86; 0: off.
    Keep it below parallel.timeout_s (600 s by default): a hang inside a collective
    otherwise ends as that collective's timeout (a process failure), without stacks."""
    hang_grace_s: float = Field(30.0, ge=0)
    """After writing its stack, how long a rank waits for the launcher to collect the stacks
    of ranks that could not write their own (the file `collected` beside the dumps) before
    it exits."""

    @model_validator(mode="after")
    def _requeue_after_naming(self) -> ResilienceConfig:
        after, patience = self.straggler_requeue_after, self.straggler_patience
        if after and after < patience:
            raise ValueError(
                f"resilience.straggler_requeue_after={after} must be 0 or at least "
                f"straggler_patience={patience}: a straggler is named before the run stops for it"
            )
        return self


class SlurmConfig(Section):
    nodes: int = Field(1, ge=1)
    """Nodes to allocate (`opt launch slurm`)."""
    gpus_per_node: int = Field(8, ge=0)
    """GPUs per node; one task (rank) per GPU. 0 for CPU-only nodes (set tasks_per_node)."""
    tasks_per_node: int | None = Field(None, ge=1)
    """Ranks per node; not set: one per GPU. Only CPU-only nodes may differ from gpus_per_node."""
    cpus_per_task: int | None = Field(None, ge=1)
    """CPU cores per rank (data loading, host work); not set leaves it to the cluster's default."""
    mem: str | None = None
    """Memory per node as sbatch takes it (e.g. 0 for all of it, 500G); not set: cluster default."""
    partition: str | None = None
    """Slurm partition; not set: the cluster's default."""
    account: str | None = None
    """Account to charge; not set: the user's default."""
    qos: str | None = None
    """Quality of service; not set: the default."""
    time_minutes: int = Field(4320, ge=1)
    """Time limit of each allocation; the job requeues itself when it runs out."""
    exclude: str | None = None
    """Nodes never to use (Slurm host list, e.g. node[003,017]); failing nodes are added."""
    nodelist: str | None = None
    """Nodes to use (Slurm host list); not set: any."""
    sbatch: list[str] = []
    """Extra sbatch options as KEY=VALUE (or KEY for a flag), e.g. ["constraint=a100"]."""
    setup: list[str] = []
    """Shell lines run at the start of each allocation (module load, source a venv, ...)."""
    signal: SlurmSignal = "USR2"
    """Slurm's warning signal before the time limit (USR1 or USR2); every rank saves on it."""
    signal_delay_s: int = Field(300, ge=1)
    """Seconds between the warning signal and the kill: must cover one step plus a
    synchronous checkpoint."""
    max_timeout_requeues: int = Field(100, ge=0)
    """Requeues after reaching the time limit before the job gives up (preemptions: no limit)."""
    max_failure_requeues: int = Field(5, ge=0)
    """Requeues after a process or node failure before the job gives up."""
    exclude_after_failures: int = Field(2, ge=0)
    """Exclude a node from later allocations once it has failed this often; 0 never."""

    @field_validator("sbatch")
    @classmethod
    def _sbatch_options(cls, options: list[str]) -> list[str]:
        for option in options:
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*(=.+)?", option.removeprefix("--")):
                raise ValueError(f"option {option!r}: expected KEY=VALUE or KEY")
        return options

    @model_validator(mode="after")
    def _one_task_per_gpu(self) -> SlurmConfig:
        if self.gpus_per_node == 0 and self.tasks_per_node is None:
            raise ValueError("slurm.gpus_per_node=0 (CPU-only nodes) needs slurm.tasks_per_node")
        if self.gpus_per_node > 0 and self.tasks_per_node not in (None, self.gpus_per_node):
            raise ValueError(
                f"slurm.tasks_per_node={self.tasks_per_node} but gpus_per_node="
                f"{self.gpus_per_node}: opt runs one task per GPU"
            )
        if self.signal_delay_s >= self.time_minutes * 60:
            raise ValueError("slurm.signal_delay_s must be shorter than the time limit")
        return self


class JobConfig(BaseModel):
    """The whole tree, one field per ``[section]``."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)

    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    supervisor: SupervisorConfig = Field(default_factory=SupervisorConfig)
    logbook: LogbookConfig = Field(default_factory=LogbookConfig)
    loss_scale: LossScaleConfig = Field(default_factory=LossScaleConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    downstream: DownstreamConfig = Field(default_factory=DownstreamConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    resilience: ResilienceConfig = Field(default_factory=ResilienceConfig)
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)

    @model_validator(mode="after")
    def _finetune_layout(self) -> JobConfig:
        packing = self.finetune.mixture is not None and self.finetune.packing
        if packing and self.parallel.pp > 1:
            raise ValueError(
                "finetune.packing needs parallel.pp = 1 (pipeline stages pass only hidden "
                "states, not the examples' boundaries); set finetune.packing = false"
            )
        if packing and self.parallel.sequence_parallel:
            raise ValueError(
                "finetune.packing does not work with parallel.sequence_parallel yet (the "
                "per-example positions are laid out per row); turn one of them off"
            )
        return self

    @model_validator(mode="after")
    def _drill_has_what_it_needs(self) -> JobConfig:
        collapse = (self.supervisor.drill or "").startswith("scale_collapse")
        if collapse and self.train.precision != "fp16":
            raise ValueError(
                "supervisor.drill=scale_collapse needs train.precision=fp16 (a loss scale)"
            )
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) / self.run.name

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) / self.run.name

    @property
    def logbook_dir(self) -> Path:
        return Path(self.logbook.dir) / self.run.name

    def with_overrides(self, values: Mapping[str, object]) -> JobConfig:
        """A validated copy with ``{"section.key": value, ...}`` changed; None unsets an
        Optional key. Bad values raise the same one-line OptError as the file would."""
        raw = self.model_dump()
        for key, value in values.items():
            _set_dotted(raw, key, value)
        return _validated(raw)


def load_config(
    path: str | Path | None,
    overrides: list[str] | None = None,
    *,
    values: Mapping[str, object] | None = None,
) -> JobConfig:
    """TOML file (optional), then ``values`` (``{"section.key": value}``), then command-line
    ``--section.key value`` overrides -> one validated JobConfig, or one OptError line."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise OptError(f"config file not found: {path}")
        try:
            raw = _unset_old_sentinels(tomllib.loads(path.read_text()))
        except tomllib.TOMLDecodeError as err:
            raise OptError(f"config file {path} is not valid TOML: {err}") from None
    for key, value in (values or {}).items():
        _set_dotted(raw, key, value)
    for key, value in parse_overrides(overrides or []):
        _set_dotted(raw, key, value)
    return _validated(raw)


def parse_overrides(args: list[str]) -> list[tuple[str, object]]:
    """``["--optim.lr", "3e-4", "--train.precision=bf16"]`` -> ``[("optim.lr", 3e-4), ...]``."""
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg:
            raise OptError(f"expected a --section.key override, got {arg!r}")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise OptError(f"override {arg} has no value")
            key, text = arg[2:], args[i + 1]
            i += 2
        pairs.append((key, _parse_value(text)))
    return pairs


def to_toml(config: JobConfig) -> str:
    """The resolved tree as TOML, None fields left out; load_config reads it back equal."""
    return tomli_w.dumps(_without_none(config.model_dump()))


def _without_none(value: object) -> object:
    """``value`` with every None-valued key dropped, also inside lists of tables."""
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value


# ----- parsing and errors -------------------------------------------------------------------
def _parse_value(text: str) -> object:
    # TOML syntax for numbers, booleans and lists; anything else is a bare string.
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _set_dotted(raw: dict, key: str, value: object) -> None:
    *sections, leaf = key.split(".")
    if not sections:
        raise OptError(f"config key {key!r}: expected section.key")
    node = raw
    for section in sections:
        node = node.setdefault(section, {})
        if not isinstance(node, dict):
            raise OptError(f"config key {key!r}: {section!r} is not a section")
    node[leaf] = value


# The values that meant "not set" in the resolved configs opt wrote before the tree had
# Optional fields (run directories, Slurm job snapshots, checkpoints of runs still going).
# A file that holds one of them means "not set" by it; typed anew, they are refused.
_OLD_SENTINELS = {
    ("model", "dropout"): lambda v: isinstance(v, (int, float)) and v < 0,
    ("model", "n_layers"): lambda v: v == 0,
    ("model", "n_heads"): lambda v: v == 0,
    ("model", "d_model"): lambda v: v == 0,
    ("model", "vocab_size"): lambda v: v == 0,
    ("train", "max_steps"): lambda v: v == 0,
    ("metrics", "peak_tflops"): lambda v: v == 0,
    ("slurm", "tasks_per_node"): lambda v: v == 0,
    ("slurm", "cpus_per_task"): lambda v: v == 0,
}


def _unset_old_sentinels(raw: dict) -> dict:
    for (section, key), is_sentinel in _OLD_SENTINELS.items():
        table = raw.get(section)
        value = table.get(key) if isinstance(table, dict) else None
        if value is not None and not isinstance(value, bool) and is_sentinel(value):
            del table[key]
    return raw


def _validated(raw: dict) -> JobConfig:
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as err:
        raise OptError(_one_line(err)) from None


_TYPE_NAMES = {"int_type": "int", "float_type": "float", "bool_type": "bool",
               "string_type": "str", "list_type": "list"}  # fmt: skip


def _one_line(err: ValidationError) -> str:
    """pydantic's first error as the line the CLI prints: the key, what it must be, the value."""
    error = err.errors(include_url=False)[0]
    path = [part for part in error["loc"] if isinstance(part, str)]  # list indices dropped
    key, kind, value = ".".join(path), error["type"], error["input"]
    field = _field_at(path)
    if kind == "extra_forbidden":
        known = _model_at(path[:-1]).model_fields
        close = difflib.get_close_matches(path[-1], known, n=1)
        hint = f" (did you mean {'.'.join([*path[:-1], close[0]])}?)" if close else ""
        return f"unknown config key '{key}'{hint}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"config section {key} must be a table, got {value!r}"
    if kind in _TYPE_NAMES:
        return f"config key {key} must be {_TYPE_NAMES[kind]}, got {value!r}"
    if kind == "literal_error" and field is not None:
        choices = get_args(_scalar_type(field.annotation)[1])
        allowed = " or ".join(choices) if len(choices) <= 2 else f"one of {', '.join(choices)}"
        return f"{key} must be {allowed}, got {value!r}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal") and field:
        unset = f" (leave {key} out for the default)" if _scalar_type(field.annotation)[0] else ""
        return f"{key} must {_bounds(field.metadata)}, got {value!r}{unset}"
    if kind == "value_error":
        message = str(error["ctx"]["error"])
        return f"{key} {message}" if field is not None else message  # a model's rule names its keys
    return f"config key {key}: {error['msg']}"


def _model_at(path: list[str]) -> type[BaseModel]:
    model: type[BaseModel] = JobConfig
    for part in path:
        model = model.model_fields[part].annotation
    return model


def _field_at(path: list[str]):
    """The FieldInfo of a leaf key; None for a section, the root or an unknown key."""
    model: type[BaseModel] = JobConfig
    for i, part in enumerate(path):
        info = model.model_fields.get(part)
        if info is None:
            return None
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
            continue
        return info if i == len(path) - 1 else None
    return None


def _bounds(metadata: list) -> str:
    """``Field(gt=0)`` -> "be positive", ``Field(ge=0, le=1)`` -> "be within [0, 1]", ..."""
    low = high = None
    for m in metadata:  # annotated_types' Gt, Ge, Lt, Le
        if getattr(m, "gt", None) is not None:
            low = f"({m.gt}"
        elif getattr(m, "ge", None) is not None:
            low = f"[{m.ge}"
        elif getattr(m, "lt", None) is not None:
            high = f"{m.lt})"
        elif getattr(m, "le", None) is not None:
            high = f"{m.le}]"
    if low and high:
        return f"be within {low}, {high}"
    if low == "(0":
        return "be positive"
    if low == "[0":
        return "not be negative"
    if low:
        return f"be at least {low[1:]}" if low[0] == "[" else f"be greater than {low[1:]}"
    return f"be at most {high[:-1]}" if high[-1] == "]" else f"be less than {high[:-1]}"


def _scalar_type(annotation: object) -> tuple[bool, object]:
    """(Optional?, the type inside): ``int | None`` -> (True, int)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in get_args(annotation) if a is not type(None)]
        if len(inner) == 1:
            return True, inner[0]
    return False, annotation
