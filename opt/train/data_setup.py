"""Connect a run's config to its token files, tokenizer, resumable batch loader and
held-out set."""

from __future__ import annotations

from pathlib import Path

from opt.config import DataSource, JobConfig
from opt.data.blend import BlendedStream, BlendSource, mixture_plan
from opt.data.dataset import DatasetPaths, TokenDataset, valid_prefix
from opt.data.loader import BatchLoader
from opt.data.prepare import ensure_builtin_dataset
from opt.data.sampler import SampleStream
from opt.errors import OptError
from opt.finetune.mixture import load_mixture
from opt.finetune.stream import FinetuneLoader, PromptedStream, survey
from opt.models.sizes import ModelArgs


def dataset_prefix(cfg: JobConfig, model_args: ModelArgs) -> Path:
    """The token-file prefix, building the embedded corpus there first when asked to."""
    if cfg.data.path is None:
        raise OptError("data.path is not set (a prefix written by `opt data prepare`)")
    prefix = Path(cfg.data.path)
    if cfg.data.builtin is not None:  # the config allows only the corpora there are
        if prefix.name != "train":
            raise OptError(
                f"data.builtin writes <dir>/train; set data.path to end in /train, not {prefix}"
            )
        # Idempotent: reuses a build made for the same vocabulary size, else rebuilds (~1 s).
        ensure_builtin_dataset(prefix.parent, model_args.vocab_size)
    return prefix


def finetune_tokenizer_file(cfg: JobConfig) -> Path:
    """The tokenizer a fine-tuning run encodes its prompts with: ``data.tokenizer``, else
    the one stored with the pretrained weights (``checkpoint.init_from``)."""
    if cfg.data.tokenizer is not None:
        path = Path(cfg.data.tokenizer)
    elif cfg.checkpoint.init_from is not None:
        path = Path(cfg.checkpoint.init_from)
    else:
        raise OptError(
            "finetune.mixture needs a tokenizer: set checkpoint.init_from (the pretrained "
            "checkpoint, which stores its tokenizer) or data.tokenizer"
        )
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise OptError(f"no tokenizer for finetune.mixture at {file}; set data.tokenizer")
    return file


def build_finetune_loader(
    cfg: JobConfig, model_args: ModelArgs, dp_rank: int = 0, dp_size: int = 1
) -> tuple[FinetuneLoader, Path]:
    """The prompted mixture's loader (checked, and surveyed if asked, before any step) and
    its tokenizer file."""
    from opt.data.tokenizer import load_tokenizer

    mixture = load_mixture(cfg.finetune.mixture)
    tokenizer_file = finetune_tokenizer_file(cfg)
    tokenizer = load_tokenizer(tokenizer_file)
    if tokenizer.get_vocab_size() > model_args.vocab_size:
        raise OptError(
            f"tokenizer {tokenizer_file} has {tokenizer.get_vocab_size()} tokens, more than "
            f"{cfg.model.name}'s {model_args.vocab_size}"
        )
    if cfg.finetune.survey:
        survey(mixture, tokenizer, cfg.data.seq_len)
    stream = PromptedStream(mixture, tokenizer, cfg.data.seq_len)
    loader = FinetuneLoader(stream, cfg.train.micro_batch_size, dp_rank, dp_size,
                            packing=cfg.finetune.packing)  # fmt: skip
    return loader, tokenizer_file


def build_loader(
    cfg: JobConfig, model_args: ModelArgs, dp_rank: int = 0, dp_size: int = 1
) -> tuple[BatchLoader | FinetuneLoader, Path]:
    """This rank's loader and the token files' prefix (fine-tuning: the tokenizer file)."""
    if cfg.finetune.mixture is not None:
        return build_finetune_loader(cfg, model_args, dp_rank, dp_size)
    if cfg.data.sources is not None:
        return build_blend_loader(cfg, model_args, dp_rank, dp_size)
    prefix = dataset_prefix(cfg, model_args)
    dataset = TokenDataset(prefix)
    _check_vocabulary(dataset, cfg, model_args)
    stream = SampleStream(
        dataset.num_samples(cfg.data.seq_len), seed=cfg.run.seed, shuffle=cfg.data.shuffle
    )
    loader = BatchLoader(
        dataset,
        stream,
        seq_len=cfg.data.seq_len,
        micro_batch_size=cfg.train.micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
    )
    return loader, prefix


def build_blend_loader(
    cfg: JobConfig, model_args: ModelArgs, dp_rank: int = 0, dp_size: int = 1
) -> tuple[BatchLoader, Path]:
    """The loader of a weighted mixture (``data.sources``) and its first source's prefix
    (where the tokenizer is looked for). Every source must be tokenized alike."""
    sources = cfg.data.sources
    datasets = [TokenDataset(source.path) for source in sources]
    first = datasets[0]
    for source, dataset in zip(sources, datasets, strict=True):
        _check_vocabulary(dataset, cfg, model_args)
        if (dataset.vocab_size, dataset.eos_id) != (first.vocab_size, first.eos_id):
            raise OptError(
                f"data.sources {source.label!r} ({source.path}) was tokenized with another "
                f"vocabulary than {sources[0].label!r} ({dataset.vocab_size} tokens, EOS "
                f"{dataset.eos_id}, against {first.vocab_size}, EOS {first.eos_id})"
            )
    stream = BlendedStream(
        [BlendSource(source.label, dataset.num_samples(cfg.data.seq_len), share(source))
         for source, dataset in zip(sources, datasets, strict=True)],
        seed=cfg.run.seed, shuffle=cfg.data.shuffle,
    )  # fmt: skip
    loader = BatchLoader(datasets, stream, cfg.data.seq_len, cfg.train.micro_batch_size,
                         dp_rank, dp_size)  # fmt: skip
    return loader, Path(sources[0].path)


def mixture_lines(
    cfg: JobConfig, loader: BatchLoader, step: int, max_steps: int, grad_accum: int
) -> list[str]:
    """What a mixture's run says first: each source's share, size and epochs by the last
    step; and, where the sources name token counts, how they compare with the run's."""
    lines = [mixture_plan(loader.stream, max_steps - step, loader.samples_per_step(grad_accum))]
    sources = cfg.data.sources
    if sources[0].tokens is not None:
        wanted, trained = sum(s.tokens for s in sources), max_steps * cfg.train.batch_tokens
        if wanted != trained:
            lines.append(
                f"data: the sources' token counts add up to {wanted:,}, and the run trains "
                f"{trained:,} tokens: each source gives {trained / wanted:.3g}x the tokens it "
                "names (the counts set the shares)"
            )
    return lines


def share(source: DataSource) -> float:
    """A source's weight in the blend: its weight, or its target token count."""
    return float(source.weight if source.weight is not None else source.tokens)


def _check_vocabulary(dataset: TokenDataset, cfg: JobConfig, model_args: ModelArgs) -> None:
    if dataset.vocab_size > model_args.vocab_size:
        raise OptError(
            f"dataset {dataset.prefix} was tokenized with a {dataset.vocab_size}-token "
            f"vocabulary, larger than {cfg.model.name}'s {model_args.vocab_size}"
        )


def held_out_dataset(
    cfg: JobConfig, train_prefix: Path, derived: bool | None = None
) -> TokenDataset | None:
    """The held-out set validation reads (``validation.path``, or ``<train_prefix>-valid``
    where it exists), or None: validation off, or no held-out set to derive. It must be
    tokenized like the training set; a derived one must be the split of this very set.
    ``derived`` forces the derived set (a mixture source's)."""
    if not cfg.validation.enabled:
        return None
    if derived is None:
        derived = cfg.validation.path is None
    prefix = valid_prefix(train_prefix) if derived else Path(cfg.validation.path)
    if derived and not DatasetPaths.of(prefix).meta.is_file():
        return None
    held_out, train = TokenDataset(prefix), TokenDataset(train_prefix)
    if (held_out.vocab_size, held_out.eos_id) != (train.vocab_size, train.eos_id):
        raise OptError(
            f"held-out set {prefix} was tokenized with another vocabulary than {train_prefix} "
            f"({held_out.vocab_size} tokens, EOS {held_out.eos_id}, against "
            f"{train.vocab_size}, EOS {train.eos_id})"
        )
    split = held_out.meta.get("split")
    if derived and isinstance(split, dict) and split.get("train_sha256") != train.meta["sha256"]:
        raise OptError(
            f"held-out set {prefix} was split from another version of {train_prefix}: it may "
            "hold documents the training set holds; prepare the two again with "
            "`opt data prepare --valid-fraction`, or set validation.enabled = false"
        )
    return held_out


def resolve_tokenizer_file(cfg: JobConfig, prefix: Path) -> Path | None:
    """tokenizer.json to store beside checkpoints so `opt score` can read text back."""
    if cfg.finetune.mixture is not None:
        return finetune_tokenizer_file(cfg)
    candidate = Path(cfg.data.tokenizer) if cfg.data.tokenizer is not None else prefix.parent
    if candidate.is_dir():
        candidate = candidate / "tokenizer.json"
    return candidate if candidate.is_file() else None
