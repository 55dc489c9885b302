"""The OPT size table: shape only. Learning rate, batch and token budgets live in configs/."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass

from opt.errors import OptError

# OPT's GPT-2 BPE has 50265 tokens; the paper pads the embedding to 50272 (a multiple of 8).
OPT_VOCAB_SIZE = 50272


@dataclass(frozen=True)
class ModelArgs:
    """Shape of an OPT decoder. Everything a checkpoint needs to rebuild the module tree."""

    n_layers: int
    """Number of transformer blocks."""
    n_heads: int
    """Attention heads; must divide d_model."""
    d_model: int
    """Hidden width."""
    ffn_dim: int = 0
    """Width of the ReLU FFN; 0 means 4 * d_model (OPT's choice)."""
    vocab_size: int = OPT_VOCAB_SIZE
    """Rows of the (tied) token embedding."""
    max_positions: int = 2048
    """Longest sequence; the learned position table has max_positions + 2 rows (OPT's offset)."""
    word_embed_dim: int = 0
    """Width of the token embedding; 0 means d_model. 350M uses 512 with project_in/out."""
    pre_norm: bool = True
    """Pre-LayerNorm blocks plus a final LayerNorm; False is 350M's post-LN without final LN."""
    dropout: float = 0.1
    """Dropout on the attention and FFN outputs (never on the embeddings)."""
    attn_dropout: float = 0.0
    """Dropout on attention probabilities (0 in OPT)."""
    init_std: float = 0.006
    """Std of the normal weight init; out_proj and fc2 are further scaled by 1/sqrt(2 * n_layers)."""

    def __post_init__(self) -> None:
        if self.ffn_dim == 0:
            object.__setattr__(self, "ffn_dim", 4 * self.d_model)
        if self.word_embed_dim == 0:
            object.__setattr__(self, "word_embed_dim", self.d_model)
        for name in ("n_layers", "n_heads", "d_model", "ffn_dim", "vocab_size", "max_positions"):
            if getattr(self, name) <= 0:
                raise OptError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads != 0:
            raise OptError(
                f"model shape: n_heads={self.n_heads} does not divide d_model={self.d_model}"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def projects_embeddings(self) -> bool:
        """True when word embeddings are narrower than the model (OPT-350M)."""
        return self.word_embed_dim != self.d_model

    def replace(self, **changes) -> ModelArgs:
        return dataclasses.replace(self, **changes)

    def reshaped(
        self,
        n_layers: int | None = None,
        n_heads: int | None = None,
        d_model: int | None = None,
        vocab_size: int | None = None,
    ) -> ModelArgs:
        """This size with the given dimensions changed (None keeps one). A new width brings
        its 4x FFN, and the word embeddings follow it unless they are projected (350M)."""
        custom = {
            key: value
            for key, value in (("n_layers", n_layers), ("n_heads", n_heads),
                               ("d_model", d_model), ("vocab_size", vocab_size))
            if value is not None
        }  # fmt: skip
        if d_model is not None:
            custom["ffn_dim"] = 4 * d_model
            if not self.projects_embeddings:
                custom["word_embed_dim"] = d_model
        return self.replace(**custom) if custom else self  # re-validates, e.g. heads | d_model

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelArgs:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise OptError(f"unknown model field(s): {', '.join(unknown)}")
        return cls(**values)


MODEL_SIZES: dict[str, ModelArgs] = {
    # A debug size for tests and the CPU demo: same code paths, a trained-on-corpus vocabulary.
    "opt-tiny": ModelArgs(n_layers=4, n_heads=4, d_model=128, vocab_size=8192, max_positions=512),
    "opt-125m": ModelArgs(n_layers=12, n_heads=12, d_model=768),
    "opt-350m": ModelArgs(
        n_layers=24, n_heads=16, d_model=1024, word_embed_dim=512, pre_norm=False
    ),
    "opt-1.3b": ModelArgs(n_layers=24, n_heads=32, d_model=2048),
    "opt-2.7b": ModelArgs(n_layers=32, n_heads=32, d_model=2560),
    "opt-6.7b": ModelArgs(n_layers=32, n_heads=32, d_model=4096),
    "opt-13b": ModelArgs(n_layers=40, n_heads=40, d_model=5120),
    "opt-30b": ModelArgs(n_layers=48, n_heads=56, d_model=7168),
    "opt-66b": ModelArgs(n_layers=64, n_heads=72, d_model=9216),
    "opt-175b": ModelArgs(n_layers=96, n_heads=96, d_model=12288),
}


def get_model_args(name: str) -> ModelArgs:
    """Look a size up by name, with a suggestion when the name is close to a known one."""
    try:
        return MODEL_SIZES[name]
    except KeyError:
        close = difflib.get_close_matches(name, MODEL_SIZES, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        known = ", ".join(MODEL_SIZES)
        raise OptError(f"unknown model size {name!r}{hint}; known sizes: {known}") from None
