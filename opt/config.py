"""The run configuration: one dataclass tree, loaded from TOML, then command-line overrides.

Precedence, lowest to highest: the defaults below, the TOML file, ``--section.key value``
overrides. The resolved tree is written to the run directory as ``config.toml`` so that a
run can always be reproduced from what it saved.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from opt.errors import OptError


@dataclass
class RunConfig:
    name: str = "run"
    """Run name: names the run directory, the checkpoint directory and the logbook."""
    dir: str = "runs"
    """Root of run directories; this run writes config and TensorBoard logs to dir/name."""
    seed: int = 0
    """Seed for weight init, dropout and data order."""


@dataclass
class ModelConfig:
    name: str = "opt-125m"
    """Size from the table in opt/models/sizes.py (see `opt configs`)."""
    dropout: float = -1.0
    """Override of the size's dropout; negative keeps the size's value (0.1)."""
    n_layers: int = 0
    """Custom shape: override the size's layer count (0 keeps it)."""
    n_heads: int = 0
    """Custom shape: override the size's head count (0 keeps it)."""
    d_model: int = 0
    """Custom shape: override the size's width (0 keeps it; ffn_dim follows as 4x)."""
    vocab_size: int = 0
    """Custom shape: override the vocabulary size (0 keeps it)."""


@dataclass
class DataConfig:
    path: str = ""
    """Prefix of the token files written by `opt data prepare` (PREFIX.bin/.idx/.json)."""
    builtin: str = ""
    """'pydoc' builds the embedded CPython-docs corpus at `path` when it is missing."""
    tokenizer: str = ""
    """Tokenizer file or directory; empty means tokenizer.json beside the token files."""
    seq_len: int = 2048
    """Tokens per training sequence."""
    prefetch: bool = True
    """Build the next step's batches in a background thread while this step computes."""
    pin_memory: bool = True
    """On GPUs, stage batches in page-locked host memory so the copy to the device is async."""


@dataclass
class OptimConfig:
    lr: float = 6e-4
    """Peak learning rate."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas (OPT: 0.9, 0.95)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices and embeddings but not biases or norms."""
    grad_clip: float = 1.0
    """Clip the global L2 gradient norm to this; 0 disables clipping."""
    fused: bool = True
    """Use torch's fused AdamW kernel."""


@dataclass
class ScheduleConfig:
    warmup_tokens: int = 375_000_000
    """Linear warmup length in tokens (OPT: 375M; 175B used 2000 steps)."""
    decay_tokens: int = 300_000_000_000
    """Tokens over which the LR decays linearly to min_lr_ratio * lr (OPT: 300B)."""
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of the peak."""


@dataclass
class TrainConfig:
    batch_tokens: int = 524_288
    """Global batch in tokens; must equal micro_batch_size * seq_len * grad_accum * dp."""
    micro_batch_size: int = 8
    """Sequences per forward/backward on each data-parallel rank."""
    max_steps: int = 0
    """Stop after this many optimizer steps; 0 means decay_tokens / batch_tokens."""
    precision: str = "fp32"
    """fp32, bf16 (autocast) or fp16 (autocast with dynamic loss scaling, OPT's setting)."""
    device: str = "auto"
    """cpu, cuda or auto (cuda when available)."""
    compile: str = "auto"
    """torch.compile each block: on, off, or auto (on for GPUs; off on CPUs, where inductor's
    blocks measured slower than eager ones)."""
    attention: str = "auto"
    """SDPA kernel: auto (PyTorch picks: flash on GPUs for bf16/fp16), flash, efficient,
    cudnn or math. flash is also the fused CPU kernel; efficient and cudnn need a GPU."""
    loss_chunk: int = 4096
    """Fused head + cross-entropy over chunks of this many tokens, never holding the whole
    batch's logits; 0 builds the full logits (always so under tp > 1 or pp > 1, where the
    loss is vocab-parallel or runs in the pipeline's last stage)."""
    cpu_bf16_compute: str = "auto"
    """bf16 matmuls and attention on a CPU: native kernels, fp32 (exact fp32 copies of the
    bf16 operands, result rounded to bf16), or auto (fp32 on CPUs without AVX-512 BF16/AMX)."""
    keep_host_memory: bool = True
    """Keep freed host memory for reuse instead of returning it to the kernel and faulting
    it back in every step (glibc; see opt/host_memory.py)."""


@dataclass
class ParallelConfig:
    dp_replicate: int = 1
    """Data-parallel replicas (HSDP: replicate across nodes, shard within)."""
    dp_shard: int = -1
    """FSDP2 (ZeRO-3) shard degree; -1 takes what the other degrees leave of the world."""
    tp: int = 1
    """Tensor-parallel degree (Megatron split; keep within a node)."""
    pp: int = 1
    """Pipeline-parallel degree."""
    pp_schedule: str = "1f1b"
    """1f1b, interleaved_1f1b (virtual stages) or gpipe; microbatches = micro_batch_size groups."""
    pp_stages_per_rank: int = 1
    """Virtual pipeline stages per rank; interleaved_1f1b needs at least 2."""
    sequence_parallel: bool = False
    """Shard LayerNorm and dropout regions by sequence across the TP group (needs tp > 1)."""
    activation_checkpoint: str = "none"
    """none, full (recompute every block) or selective (keep matmul/attention outputs)."""
    timeout_s: float = 600.0
    """A collective that waits longer than this fails instead of hanging the job."""
    fsdp_mixed_precision: bool = True
    """Under bf16, FSDP gathers block parameters in bf16 and reduces gradients in fp32;
    the sharded fp32 master weights and optimizer state are unchanged."""


@dataclass
class SupervisorConfig:
    enabled: bool = True
    """Watch every step for divergence and act by the ladder below."""
    window: int = 50
    """Healthy steps of loss and grad-norm history the robust statistics use."""
    min_steps: int = 20
    """Healthy steps seen before the spike and grad-norm detectors arm."""
    spike_z: float = 6.0
    """A loss more than this many robust standard deviations (1.4826 MAD) above the median is a spike."""
    spike_min_rise: float = 0.05
    """...and at least this much above the median (absolute), so flat curves cannot trip it."""
    grad_norm_factor: float = 10.0
    """A grad norm above this multiple of its running median is an explosion; 0 disables."""
    scale_collapses: int = 5
    """fp16 overflows within `window` steps that count as a loss-scale collapse (floor counts always)."""
    ladder: list[str] = field(
        default_factory=lambda: [
            "skip",
            "rollback+lower_lr_clip",
            "rollback+lower_lr_clip+skip_data",
            "rollback+reset_optimizer",
            "stop",
        ]
    )
    """Escalation, one rung per anomaly of an incident; moves joined by '+': skip, rollback,
    lower_lr_clip, skip_data, reset_optimizer, stop."""
    lr_factor: float = 0.9
    """lower_lr_clip multiplies the LR scale by this (OPT: -10%, later to 2/3)."""
    clip_factor: float = 0.6
    """lower_lr_clip multiplies the clip threshold by this (OPT: 2.5 -> 1.5 -> 1.0)."""
    healthy_margin: int = 5
    """A rollback target must be saved at least this many steps before the incident began."""
    skip_data_steps: int = 10
    """skip_data drops this many steps' worth of samples before the anomaly."""
    rewarmup_steps: int = 20
    """reset_optimizer zeroes Adam's moments and re-warms the LR from 0 over this many steps."""
    recovery_steps: int = 20
    """Healthy steps after an intervention before its outcome is judged and the ladder resets."""
    max_interventions: int = 10
    """More interventions than this within `intervention_window` steps stops the run."""
    intervention_window: int = 1000
    """Window (steps) for max_interventions."""
    drill: str = ""
    """Fault drill: KIND@STEP[xN][!] with KIND spike, nan or scale_collapse; xN lasts N steps;
    ! repeats it every time STEP is reached again (persistent divergence)."""


@dataclass
class LogbookConfig:
    dir: str = "logbook"
    """Root of the public logbooks; this run writes dir/<run.name>/."""
    pue: float = 1.1
    """Data-centre power usage effectiveness, for the CO2e in run_stop events."""
    carbon_intensity: float = 0.231
    """kg CO2e per kWh of the grid, for the CO2e in run_stop events."""


@dataclass
class LossScaleConfig:
    init_scale: float = 2.0**15
    """Starting fp16 loss scale."""
    growth_interval: int = 1000
    """Double the scale after this many steps without overflow."""
    min_scale: float = 2.0**-5
    """The floor; the supervisor treats reaching it as a divergence signal."""


@dataclass
class CheckpointConfig:
    dir: str = "checkpoints"
    """Root of checkpoint directories; this run writes dir/<run.name>/step_NNNNNNNN."""
    every: int = 1000
    """Save every this many steps (and at the end of training)."""
    keep_last: int = 3
    """Keep this many newest checkpoints; 0 keeps all."""
    resume: str = "auto"
    """auto (newest complete checkpoint, if any), none, or a checkpoint directory."""
    init_from: str = ""
    """Start a fresh run from the weights of this checkpoint (e.g. `opt convert from-hf`)."""
    async_save: bool = True
    """Write checkpoints in the background; the manifest commits once every shard is on disk.
    Saves for a stop (signal, supervisor) are synchronous whatever this says."""
    async_staging: bool = True
    """With async_save: copy the tensors to host memory in a background thread too, waiting
    for the copy only before the next optimizer step. The host buffers are kept for the run
    (pinned on a GPU): the size of each rank's model and optimizer state. Off: the copy is
    made inside the save call, into buffers freed after the write."""


@dataclass
class MetricsConfig:
    log_every: int = 10
    """Console and TensorBoard logging interval in steps."""
    tensorboard: bool = True
    """Write TensorBoard event files to <run dir>/tensorboard."""
    peak_tflops: float = 0.0
    """Per-device peak for MFU in the training dtype; 0 measures a matmul peak at start."""


@dataclass
class SlurmConfig:
    nodes: int = 1
    """Nodes to allocate (`opt launch slurm`)."""
    gpus_per_node: int = 8
    """GPUs per node; one task (rank) per GPU. 0 for CPU-only nodes (set tasks_per_node)."""
    tasks_per_node: int = 0
    """Ranks per node; 0 means one per GPU. Only CPU-only nodes may differ from gpus_per_node."""
    cpus_per_task: int = 0
    """CPU cores per rank (data loading, host work); 0 leaves it to the cluster's default."""
    mem: str = ""
    """Memory per node as sbatch takes it (e.g. 0 for all of it, 500G); empty: cluster default."""
    partition: str = ""
    """Slurm partition; empty: the cluster's default."""
    account: str = ""
    """Account to charge; empty: the user's default."""
    qos: str = ""
    """Quality of service; empty: the default."""
    time_minutes: int = 4320
    """Time limit of each allocation; the job requeues itself when it runs out."""
    exclude: str = ""
    """Nodes never to use (Slurm host list, e.g. node[003,017]); failing nodes are added."""
    nodelist: str = ""
    """Nodes to use (Slurm host list); empty: any."""
    sbatch: list[str] = field(default_factory=list)
    """Extra sbatch options as KEY=VALUE (or KEY for a flag), e.g. ["constraint=a100"]."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run at the start of each allocation (module load, source a venv, ...)."""
    signal: str = "USR2"
    """Slurm's warning signal before the time limit (USR1 or USR2); every rank saves on it."""
    signal_delay_s: int = 300
    """Seconds between the warning signal and the kill: must cover one step plus a
    synchronous checkpoint."""
    max_timeout_requeues: int = 100
    """Requeues after reaching the time limit before the job gives up (preemptions: no limit)."""
    max_failure_requeues: int = 5
    """Requeues after a process or node failure before the job gives up."""
    exclude_after_failures: int = 2
    """Exclude a node from later allocations once it has failed this often; 0 never."""


@dataclass
class JobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    logbook: LogbookConfig = field(default_factory=LogbookConfig)
    loss_scale: LossScaleConfig = field(default_factory=LossScaleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) / self.run.name

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) / self.run.name

    @property
    def logbook_dir(self) -> Path:
        return Path(self.logbook.dir) / self.run.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRECISIONS = ("fp32", "bf16", "fp16")
PP_SCHEDULES = ("1f1b", "interleaved_1f1b", "gpipe")
LADDER_MOVES = ("skip", "rollback", "lower_lr_clip", "skip_data", "reset_optimizer", "stop")
DRILL = re.compile(r"^(spike|nan|scale_collapse)@(\d+)(?:x(\d+))?(!?)$")
ACTIVATION_CHECKPOINT = ("none", "full", "selective")
COMPILE = ("auto", "on", "off")
ATTENTION = ("auto", "flash", "efficient", "cudnn", "math")
CPU_BF16_COMPUTE = ("auto", "native", "fp32")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> JobConfig:
    """TOML file (optional) plus ``--section.key value`` overrides -> validated JobConfig."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise OptError(f"config file not found: {path}")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise OptError(f"config file {path} is not valid TOML: {err}") from None
    for key, value in parse_overrides(overrides or []):
        _set_dotted(raw, key, value)
    config = _build(JobConfig, raw, prefix="")
    validate(config)
    return config


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


def _parse_value(text: str) -> object:
    # TOML syntax for numbers, booleans and lists; anything else is a bare string.
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _set_dotted(raw: dict, key: str, value: object) -> None:
    *sections, leaf = key.split(".")
    node = raw
    for section in sections:
        node = node.setdefault(section, {})
        if not isinstance(node, dict):
            raise OptError(f"config key {key!r}: {section!r} is not a section")
    node[leaf] = value


def _build(cls: type, raw: dict, prefix: str):
    if not isinstance(raw, dict):
        raise OptError(f"config section {prefix.rstrip('.') or '<root>'} must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise OptError(f"unknown config key '{prefix}{key}'{hint}")
    values = {}
    for name in fields & raw.keys():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, raw[name], f"{prefix}{name}.")
        else:
            values[name] = _coerce(raw[name], hint, f"{prefix}{name}")
    for name in fields - raw.keys():
        if dataclasses.is_dataclass(hints[name]):
            values[name] = _build(hints[name], {}, f"{prefix}{name}.")
    return cls(**values)


def _coerce(value: object, hint: object, key: str) -> object:
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise OptError(f"config key {key} must be a list, got {value!r}")
        return [_coerce(v, item, key) for v in value]
    if isinstance(hint, types.UnionType):
        raise TypeError(f"unsupported config type for {key}")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)  # 3e8 in TOML is a float; token counts are ints
    if hint is str and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # `--slurm.mem 0`: a number on the command line, a string to sbatch
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise OptError(f"config key {key} must be {hint.__name__}, got {value!r}")
    return value


def validate(config: JobConfig) -> None:
    """Checks that need no model or data; the trainer checks the rest before allocating."""
    if config.train.precision not in PRECISIONS:
        raise OptError(
            f"train.precision must be one of {', '.join(PRECISIONS)}, got {config.train.precision!r}"
        )
    if config.train.device not in ("auto", "cpu", "cuda"):
        raise OptError(f"train.device must be auto, cpu or cuda, got {config.train.device!r}")
    choices = {"train.compile": COMPILE, "train.attention": ATTENTION,
               "train.cpu_bf16_compute": CPU_BF16_COMPUTE}  # fmt: skip
    for key, allowed in choices.items():
        value = getattr(config.train, key.split(".")[1])
        if value not in allowed:
            raise OptError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
    if config.train.loss_chunk < 0:
        raise OptError(f"train.loss_chunk must not be negative, got {config.train.loss_chunk}")
    positive = {
        "data.seq_len": config.data.seq_len,
        "train.micro_batch_size": config.train.micro_batch_size,
        "train.batch_tokens": config.train.batch_tokens,
        "optim.lr": config.optim.lr,
        "metrics.log_every": config.metrics.log_every,
        "checkpoint.every": config.checkpoint.every,
        "schedule.decay_tokens": config.schedule.decay_tokens,
    }
    for key, value in positive.items():
        if value <= 0:
            raise OptError(f"{key} must be positive, got {value}")
    _validate_supervisor(config)
    _validate_slurm(config.slurm)
    par = config.parallel
    if par.pp_schedule not in PP_SCHEDULES:
        raise OptError(
            f"parallel.pp_schedule must be one of {', '.join(PP_SCHEDULES)}, got {par.pp_schedule!r}"
        )
    if par.activation_checkpoint not in ACTIVATION_CHECKPOINT:
        raise OptError(
            "parallel.activation_checkpoint must be one of "
            f"{', '.join(ACTIVATION_CHECKPOINT)}, got {par.activation_checkpoint!r}"
        )
    if par.pp_stages_per_rank < 1:
        raise OptError(
            f"parallel.pp_stages_per_rank must be at least 1, got {par.pp_stages_per_rank}"
        )
    if par.pp_schedule == "interleaved_1f1b" and par.pp_stages_per_rank < 2:
        raise OptError("parallel.pp_schedule=interleaved_1f1b needs pp_stages_per_rank >= 2")
    if par.pp_schedule != "interleaved_1f1b" and par.pp_stages_per_rank != 1:
        raise OptError(f"parallel.pp_schedule={par.pp_schedule} runs one stage per rank")
    if par.sequence_parallel and par.tp < 2:
        raise OptError("parallel.sequence_parallel needs parallel.tp > 1")
    if par.timeout_s <= 0:
        raise OptError(f"parallel.timeout_s must be positive, got {par.timeout_s}")
    if len(config.optim.betas) != 2:
        raise OptError(f"optim.betas must have two values, got {config.optim.betas}")
    if not 0.0 <= config.schedule.min_lr_ratio <= 1.0:
        raise OptError("schedule.min_lr_ratio must be within [0, 1]")
    if config.checkpoint.keep_last < 0 or config.train.max_steps < 0:
        raise OptError("checkpoint.keep_last and train.max_steps must not be negative")


def _validate_slurm(slurm: SlurmConfig) -> None:
    at_least = {"nodes": 1, "time_minutes": 1, "signal_delay_s": 1, "gpus_per_node": 0,
                "tasks_per_node": 0, "cpus_per_task": 0, "max_timeout_requeues": 0,
                "max_failure_requeues": 0, "exclude_after_failures": 0}  # fmt: skip
    for key, low in at_least.items():
        if getattr(slurm, key) < low:
            raise OptError(f"slurm.{key} must be at least {low}, got {getattr(slurm, key)}")
    if slurm.gpus_per_node == 0 and slurm.tasks_per_node == 0:
        raise OptError("slurm.gpus_per_node=0 (CPU-only nodes) needs slurm.tasks_per_node")
    if slurm.gpus_per_node > 0 and slurm.tasks_per_node not in (0, slurm.gpus_per_node):
        raise OptError(
            f"slurm.tasks_per_node={slurm.tasks_per_node} but gpus_per_node="
            f"{slurm.gpus_per_node}: opt runs one task per GPU"
        )
    if slurm.signal not in ("USR1", "USR2"):
        raise OptError(f"slurm.signal must be USR1 or USR2, got {slurm.signal!r}")
    if slurm.signal_delay_s >= slurm.time_minutes * 60:
        raise OptError("slurm.signal_delay_s must be shorter than the time limit")
    for option in slurm.sbatch:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*(=.+)?", option.removeprefix("--")):
            raise OptError(f"slurm.sbatch option {option!r}: expected KEY=VALUE or KEY")


def _validate_supervisor(config: JobConfig) -> None:
    sup = config.supervisor
    if not sup.ladder:
        raise OptError("supervisor.ladder must have at least one rung (e.g. ['stop'])")
    for rung in sup.ladder:
        moves = rung.split("+")
        unknown = [m for m in moves if m not in LADDER_MOVES]
        if unknown:
            raise OptError(
                f"supervisor.ladder rung {rung!r}: unknown move {unknown[0]!r} "
                f"(moves: {', '.join(LADDER_MOVES)})"
            )
        needs_rollback = {"lower_lr_clip", "skip_data", "reset_optimizer"} & set(moves)
        if needs_rollback and "rollback" not in moves:
            raise OptError(
                f"supervisor.ladder rung {rung!r}: {sorted(needs_rollback)[0]} needs rollback"
            )
    if sup.drill and not DRILL.match(sup.drill):
        raise OptError(
            f"supervisor.drill={sup.drill!r}: expected KIND@STEP[xN][!], KIND one of spike, nan, "
            "scale_collapse (e.g. spike@30x2)"
        )
    if sup.drill.startswith("scale_collapse") and config.train.precision != "fp16":
        raise OptError("supervisor.drill=scale_collapse needs train.precision=fp16 (a loss scale)")
    for key in (
        "window",
        "min_steps",
        "recovery_steps",
        "max_interventions",
        "intervention_window",
    ):
        if getattr(sup, key) < 1:
            raise OptError(f"supervisor.{key} must be at least 1, got {getattr(sup, key)}")
    if not (0 < sup.lr_factor <= 1 and 0 < sup.clip_factor <= 1):
        raise OptError("supervisor.lr_factor and clip_factor must be within (0, 1]")


def to_toml(config: JobConfig) -> str:
    """Serialise the resolved tree; tomllib reads it back to an equal JobConfig."""
    lines = []
    for section, values in config.to_dict().items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)
