"""`opt configs`: the model sizes with their exact parameter counts."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    configs = sub.add_parser("configs", help="list the model sizes with exact parameter counts")
    configs.add_argument("--json", action="store_true", help="print JSON instead of a table")
    configs.set_defaults(func=cmd_configs)


def cmd_configs(args: argparse.Namespace) -> int:
    from opt.models.model import count_parameters
    from opt.models.sizes import MODEL_SIZES

    rows = []
    for name, shape in MODEL_SIZES.items():
        rows.append(
            {
                "name": name,
                "layers": shape.n_layers,
                "heads": shape.n_heads,
                "d_model": shape.d_model,
                "ffn_dim": shape.ffn_dim,
                "vocab": shape.vocab_size,
                "layernorm": "pre" if shape.pre_norm else "post",
                "params": count_parameters(shape),
            }
        )
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    header = f"{'name':<10} {'layers':>6} {'heads':>5} {'d_model':>7} {'ffn':>6} {'vocab':>6} {'LN':>4} {'parameters':>16}"
    print(header)
    for r in rows:
        print(
            f"{r['name']:<10} {r['layers']:>6} {r['heads']:>5} {r['d_model']:>7} {r['ffn_dim']:>6} "
            f"{r['vocab']:>6} {r['layernorm']:>4} {r['params']:>16,}"
        )
    return 0
