"""``opt convert``: move weights between our checkpoints and Hugging Face transformers."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # opt.models imports torch, which `opt --help` should not wait for
    from opt.models.sizes import ModelArgs


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``convert from-hf`` and ``convert to-hf`` to the top-level ``opt`` parser."""
    convert = subparsers.add_parser(
        "convert",
        help="convert weights to and from Hugging Face transformers",
        description="Convert OPT weights between our checkpoints and Hugging Face transformers "
        "directories (config.json + safetensors; pickled .bin files are refused).",
    )
    commands = convert.add_subparsers(dest="convert_command", metavar="COMMAND", required=True)

    from_hf = commands.add_parser(
        "from-hf",
        help="import a transformers OPT directory as a checkpoint",
        description="Import a transformers OPT directory (config.json, model.safetensors or a "
        "sharded index, tokenizer files if present) as a weights-only checkpoint.",
    )
    from_hf.add_argument("hf_dir", metavar="HF_DIR", type=Path, help="transformers model directory")
    from_hf.add_argument(
        "ckpt_dir", metavar="CKPT_DIR", type=Path, help="checkpoint to create (new or empty)"
    )
    from_hf.set_defaults(func=_run_from_hf)

    to_hf = commands.add_parser(
        "to-hf",
        help="export a checkpoint as a transformers OPT directory",
        description="Export a checkpoint's weights as a directory that "
        "transformers.OPTForCausalLM.from_pretrained loads (fp32, tied lm_head).",
    )
    to_hf.add_argument("ckpt_dir", metavar="CKPT_DIR", type=Path, help="checkpoint directory")
    to_hf.add_argument(
        "hf_dir",
        metavar="HF_DIR",
        type=Path,
        help="transformers directory to create (new or empty)",
    )
    to_hf.set_defaults(func=_run_to_hf)


# The conversion module is imported only when a command runs, so `opt --help` stays fast
# (it pulls in torch and safetensors).


def _run_from_hf(args: argparse.Namespace) -> int:
    from opt.convert.hf import from_hf

    model_args = from_hf(args.hf_dir, args.ckpt_dir)
    print(f"converted {args.hf_dir} -> {args.ckpt_dir} ({_describe(model_args)})")
    return 0


def _run_to_hf(args: argparse.Namespace) -> int:
    from opt.convert.hf import to_hf

    model_args = to_hf(args.ckpt_dir, args.hf_dir)
    print(f"converted {args.ckpt_dir} -> {args.hf_dir} ({_describe(model_args)})")
    return 0


def _describe(model_args: ModelArgs) -> str:
    from opt.models.model import count_parameters

    return (
        f"{model_args.n_layers} layers, d_model {model_args.d_model}, "
        f"{count_parameters(model_args):,} parameters"
    )
