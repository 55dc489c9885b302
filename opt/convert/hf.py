"""Hugging Face transformers interop: OPT ``config.json`` + safetensors <-> our checkpoints.

transformers itself is not needed at runtime: the config is plain JSON and the weights are
safetensors, read and written with the ``safetensors`` package. Pickled ``.bin`` weights are
never loaded (unpickling runs arbitrary code).

Weights are read tensor by tensor with ``safe_open`` rather than a whole shard at a time
with ``load_file``: the peak is the model plus one tensor, not plus one (multi-GB) shard,
and names, shapes and dtypes are all checked from the headers before any data is read.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from opt.checkpoint import load_model, save_checkpoint
from opt.errors import OptError
from opt.models.model import OPTModel, empty_model
from opt.models.sizes import ModelArgs

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
_NUMBER = (int, float)
# transformers' OPTConfig keys that describe the model, in the order config.json is written:
# (the default OPTConfig applies when a config.json leaves the key out, so that a config
# means the same model here as there (note ffn_dim: 3072, not 4 * hidden_size); the type a
# value must have; the ModelArgs field it maps to). Keys without a field are features our
# model has one way only, transformers' default, which _refuse_unsupported insists on.
HF_KEYS: dict[str, tuple[object, type | tuple[type, ...], str | None]] = {
    "vocab_size": (50272, int, "vocab_size"),
    "hidden_size": (768, int, "d_model"),
    "num_hidden_layers": (12, int, "n_layers"),
    "num_attention_heads": (12, int, "n_heads"),
    "ffn_dim": (3072, int, "ffn_dim"),
    "max_position_embeddings": (2048, int, "max_positions"),
    # None (or absent) means "as wide as the model", as in OPTConfig.
    "word_embed_proj_dim": (None, (int, type(None)), "word_embed_dim"),
    "do_layer_norm_before": (True, bool, "pre_norm"),
    "_remove_final_layer_norm": (False, bool, None),
    "activation_function": ("relu", str, None),
    "enable_bias": (True, bool, None),
    "layer_norm_elementwise_affine": (True, bool, None),
    "tie_word_embeddings": (True, bool, None),
    "dropout": (0.1, _NUMBER, "dropout"),
    "attention_dropout": (0.0, _NUMBER, "attn_dropout"),
    "layerdrop": (0.0, _NUMBER, None),
    "init_std": (0.02, _NUMBER, "init_std"),
}
HF_DEFAULTS = {key: default for key, (default, _, _) in HF_KEYS.items()}
# Floating dtypes as safetensors headers name them; anything else (ints, fp8) is a quantized
# or foreign checkpoint that a plain upcast would silently get wrong.
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}

HF_PREFIX = "model.decoder."
LM_HEAD = "lm_head.weight"
# Module paths, ours -> transformers' (below model.decoder. and layers.{i}.). Parameter
# names (weight, bias) are the same on both sides.
_TOP_LEVEL = {
    "embed_tokens": "embed_tokens",
    "embed_positions": "embed_positions",
    "project_in": "project_in",
    "project_out": "project_out",
    "final_norm": "final_layer_norm",
}
_PER_LAYER = {
    "attn_norm": "self_attn_layer_norm",
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.out_proj": "self_attn.out_proj",
    # transformers calls the norm in front of the FFN the layer's "final_layer_norm".
    "ffn_norm": "final_layer_norm",
    "ffn.fc1": "fc1",
    "ffn.fc2": "fc2",
}
_HF_TOP_LEVEL = {hf: ours for ours, hf in _TOP_LEVEL.items()}
_HF_PER_LAYER = {hf: ours for ours, hf in _PER_LAYER.items()}
_SHOW = 5  # how many names an error about missing/unexpected tensors lists


# --- config -------------------------------------------------------------------------------


def _field(cfg: dict, key: str):
    default, kind, _ = HF_KEYS[key]
    value = cfg.get(key, default)
    # bool is an int subclass; a dimension of True is a broken config, not 1.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise OptError(f"config.json: {key} has an invalid value {value!r}")
    return value


def _refuse_unsupported(cfg: dict) -> None:
    """Raise on config features our OPTModel has no way to express."""
    if (model_type := cfg.get("model_type")) != "opt":
        raise OptError(f"config.json: model_type is {model_type!r}, only 'opt' can be converted")
    checks = [
        (_field(cfg, "activation_function") == "relu", "activation_function must be relu"),
        (_field(cfg, "enable_bias"), "enable_bias=false (bias-free linears)"),
        (
            _field(cfg, "layer_norm_elementwise_affine"),
            "layer_norm_elementwise_affine=false (LayerNorm without weights)",
        ),
        (_field(cfg, "tie_word_embeddings"), "tie_word_embeddings=false (untied lm_head)"),
        (
            not (_field(cfg, "do_layer_norm_before") and _field(cfg, "_remove_final_layer_norm")),
            "_remove_final_layer_norm=true with pre-LN blocks",
        ),
        # A training-time regulariser, but the blocks have no way to skip layers, so a
        # conversion would silently change how the model trains.
        (_field(cfg, "layerdrop") == 0, "layerdrop > 0 (set it to 0 to convert)"),
    ]
    for ok, what in checks:
        if not ok:
            raise OptError(f"config.json: unsupported OPT variant: {what}")


def args_from_hf_config(cfg: dict) -> ModelArgs:
    """Our model shape for a transformers OPT ``config.json`` dict; OptError if unsupported."""
    _refuse_unsupported(cfg)
    fields = {}
    for key, (_, kind, ours) in HF_KEYS.items():
        if ours is not None:
            value = _field(cfg, key)
            fields[ours] = float(value) if kind == _NUMBER else value
    fields["word_embed_dim"] = fields["word_embed_dim"] or fields["d_model"]
    return ModelArgs(**fields)


def hf_config_from_args(args: ModelArgs) -> dict:
    """A complete transformers ``config.json`` for ``args`` (fp32 weights, tied lm_head)."""
    return {
        "architectures": ["OPTForCausalLM"],
        "model_type": "opt",
        **{
            key: default if ours is None else getattr(args, ours)
            for key, (default, _, ours) in HF_KEYS.items()
        },
        # OPT's GPT-2 tokenizer: </s> doubles as bos and eos, <pad> is 1.
        "pad_token_id": 1,
        "bos_token_id": 2,
        "eos_token_id": 2,
        "use_cache": True,
        # transformers >= 4.56 reads "dtype"; older releases read only "torch_dtype".
        "dtype": "float32",
        "torch_dtype": "float32",
    }


def read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / CONFIG_FILE
    if not hf_dir.is_dir():
        raise OptError(f"Hugging Face model directory not found: {hf_dir}")
    if not path.is_file():
        raise OptError(f"no {CONFIG_FILE} in {hf_dir}: not a Hugging Face model directory")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise OptError(f"cannot read {path}: {err}") from None
    if not isinstance(cfg, dict):
        raise OptError(f"{path} is not a JSON object")
    return cfg


# --- key mapping --------------------------------------------------------------------------


def our_key_to_hf(key: str) -> str:
    """``layers.3.ffn_norm.weight`` -> ``model.decoder.layers.3.final_layer_norm.weight``."""
    module, param = key.rsplit(".", 1)
    if module.startswith("layers."):
        _, index, rest = module.split(".", 2)
        return f"{HF_PREFIX}layers.{index}.{_PER_LAYER[rest]}.{param}"
    return f"{HF_PREFIX}{_TOP_LEVEL[module]}.{param}"


def hf_key_to_ours(key: str) -> str | None:
    """Our name for a transformers key (with or without ``model.``), or None if unknown.

    ``lm_head.weight`` has no name of ours: the output layer is tied to ``embed_tokens``.
    """
    # Original facebook/opt uploads hold OPTModel weights: "decoder.…" without "model.".
    key = key.removeprefix("model.")
    if not key.startswith("decoder.") or key.count(".") < 2:
        return None
    module, param = key.removeprefix("decoder.").rsplit(".", 1)
    if module.startswith("layers."):
        parts = module.split(".", 2)
        rest = _HF_PER_LAYER.get(parts[2]) if len(parts) == 3 else None
        return f"layers.{parts[1]}.{rest}.{param}" if rest else None
    rest = _HF_TOP_LEVEL.get(module)
    return f"{rest}.{param}" if rest else None


# --- reading transformers weights ---------------------------------------------------------


def hf_weight_files(hf_dir: Path) -> list[Path]:
    """The safetensors file(s) holding the weights, in the order transformers prefers."""
    if (hf_dir / WEIGHTS_FILE).is_file():
        return [hf_dir / WEIGHTS_FILE]
    if (hf_dir / WEIGHTS_INDEX_FILE).is_file():
        return _shards_from_index(hf_dir / WEIGHTS_INDEX_FILE)
    pickles = [name for name in PICKLE_WEIGHTS if (hf_dir / name).is_file()]
    if pickles:
        raise OptError(
            f"{hf_dir} has only {pickles[0]} (a pickle, never loaded): only safetensors weights "
            f"are accepted; re-save the model with save_pretrained(safe_serialization=True)"
        )
    raise OptError(f"no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE} in {hf_dir}")


def _shards_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise OptError(f"cannot read shard list from {index}: {err}") from None
    shards = []
    for name in names:
        # Shard names come from a downloaded file: keep them inside the model directory.
        if not isinstance(name, str) or Path(name).name != name:
            raise OptError(f"{index} names an invalid shard file {name!r}")
        if not (index.parent / name).is_file():
            raise OptError(f"{index} lists shard {name}, which is missing")
        shards.append(index.parent / name)
    return shards


def _scan(files: Iterable[Path]) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """Every tensor's file, shape and dtype, read from the safetensors headers only."""
    found: dict[str, tuple[Path, tuple[int, ...], str]] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                    if key in found:
                        raise OptError(f"tensor {key} appears in both {found[key][0]} and {path}")
                    view = f.get_slice(key)
                    found[key] = (path, tuple(view.get_shape()), view.get_dtype())
        except (SafetensorError, OSError) as err:
            raise OptError(f"cannot read {path}: {err}") from None
    return found


def _names(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    more = f" (and {len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def _plan(scan: dict, targets: dict[str, torch.Tensor], where: Path) -> dict[str, str]:
    """HF key -> our key for every tensor to load; OptError on any name/shape/dtype mismatch."""
    plan: dict[str, str] = {}
    filled: set[str] = set()
    unexpected = []
    for key in scan:
        if key == LM_HEAD:
            # Tied: checked against embed_tokens for shape here, for equality after loading.
            plan[key] = "embed_tokens.weight"
            continue
        ours = hf_key_to_ours(key)
        # A second tensor for the same parameter ("decoder.x" beside "model.decoder.x") is
        # as wrong as an unknown one.
        if ours not in targets or ours in filled:
            unexpected.append(key)
            continue
        plan[key] = ours
        filled.add(ours)
    missing = set(targets) - filled
    if missing:
        hf_names = [our_key_to_hf(key) for key in missing]
        raise OptError(f"{where} lacks tensors that its config.json implies: {_names(hf_names)}")
    if unexpected:
        raise OptError(f"{where} has tensors this OPT model has no place for: {_names(unexpected)}")
    for key, ours in plan.items():
        _, shape, dtype = scan[key]
        if shape != tuple(targets[ours].shape):
            raise OptError(
                f"{where}: tensor {key} has shape {list(shape)} but config.json implies "
                f"{list(targets[ours].shape)}"
            )
        if dtype not in FLOAT_DTYPES:
            raise OptError(f"{where}: tensor {key} has dtype {dtype}; only float weights work")
    return plan


@torch.no_grad()
def load_hf_weights(files: list[Path], model: OPTModel) -> None:
    """Fill ``model`` (allocated, any init) from transformers safetensors files, strictly."""
    targets = model.state_dict()
    scan = _scan(files)
    plan = _plan(scan, targets, files[0].parent)
    lm_head = None
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for key in (key for key in plan if scan[key][0] == path):
                    tensor = f.get_tensor(key)
                    if key == LM_HEAD:
                        lm_head = tensor
                    else:
                        targets[plan[key]].copy_(tensor)  # upcasts fp16/bf16 to our fp32
        except (SafetensorError, OSError) as err:
            raise OptError(f"cannot read {path}: {err}") from None
    if lm_head is not None and not torch.equal(
        lm_head.to(targets["embed_tokens.weight"].dtype), targets["embed_tokens.weight"]
    ):
        raise OptError(
            f"{LM_HEAD} differs from embed_tokens: untied lm_head not supported "
            f"(our output layer reuses the token embedding)"
        )


# --- conversions --------------------------------------------------------------------------


def _require_empty(path: Path, what: str) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise OptError(f"{what} {path} already exists and is not empty; choose a new directory")


def _tokenizer_files(directory: Path) -> dict[str, bytes]:
    return {n: (directory / n).read_bytes() for n in TOKENIZER_FILES if (directory / n).is_file()}


def _exported_tokenizer_files(ckpt_dir: Path, args: ModelArgs) -> dict[str, bytes]:
    """The checkpoint's tokenizer files for a transformers directory. One that came from
    transformers (it has a tokenizer_config.json) goes back as it came; one opt trained (a
    bare tokenizer.json) is given what facebook/opt's tokenizer has: every text starts with
    ``</s>`` (as every pretraining document did), and a tokenizer_config.json naming the
    special tokens, so that ``AutoTokenizer`` loads it and lm-eval's or anyone's scoring
    through transformers reads what ours reads."""
    files = _tokenizer_files(ckpt_dir)
    if "tokenizer.json" not in files or "tokenizer_config.json" in files:
        return files
    from tokenizers import Tokenizer, processors

    try:
        tokenizer = Tokenizer.from_str(files["tokenizer.json"].decode())
    except Exception:  # the tokenizers library's own error types: not one it can read
        return files  # passed through as it is, as any file opt does not understand
    eos = tokenizer.token_to_id("</s>")
    if eos is None:
        return files  # not an OPT-style vocabulary: left as it is
    tokenizer.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", eos)]
    )
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "</s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "model_max_length": args.max_positions,
    }
    return {
        "tokenizer.json": tokenizer.to_str().encode(),
        "tokenizer_config.json": (json.dumps(config, indent=2) + "\n").encode(),
    }


def from_hf(hf_dir: str | Path, ckpt_dir: str | Path) -> ModelArgs:
    """Import a transformers OPT directory (config.json + safetensors) as our checkpoint."""
    hf_dir, ckpt_dir = Path(hf_dir), Path(ckpt_dir)
    _require_empty(ckpt_dir, "checkpoint directory")
    args = args_from_hf_config(read_hf_config(hf_dir))
    files = hf_weight_files(hf_dir)
    model = empty_model(args)  # no init: every tensor is overwritten next
    load_hf_weights(files, model)
    save_checkpoint(ckpt_dir, model=model, model_args=args, extra_files=_tokenizer_files(hf_dir))
    return args


def to_hf(ckpt_dir: str | Path, hf_dir: str | Path) -> ModelArgs:
    """Export our checkpoint as a transformers directory that ``OPTForCausalLM`` loads.

    lm_head is omitted: the config ties it, and transformers re-ties it on load.
    """
    ckpt_dir, hf_dir = Path(ckpt_dir), Path(hf_dir)
    _require_empty(hf_dir, "output directory")
    model = load_model(ckpt_dir)
    args = model.args
    tensors = {our_key_to_hf(k): v.contiguous() for k, v in model.state_dict().items()}
    hf_dir.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed into place: a failure leaves no half-written
    # directory that transformers would try to load.
    # (mkdir, not mkdtemp: mkdtemp's 0700 mode would survive the rename.)
    tmp = hf_dir.parent / f".{hf_dir.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed run with our pid
    tmp.mkdir()
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config_from_args(args), indent=2) + "\n")
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        # safetensors creates the file 0600; give it the umask-derived mode config.json got,
        # so a shared model directory is readable by the people it is shared with.
        os.chmod(tmp / WEIGHTS_FILE, (tmp / CONFIG_FILE).stat().st_mode & 0o777)
        for name, data in _exported_tokenizer_files(ckpt_dir, args).items():
            (tmp / name).write_bytes(data)
        os.replace(tmp, hf_dir)  # allowed over an empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return args
