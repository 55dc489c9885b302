"""The single-device OPT model: shapes, exact parameter counts, OPT's architectural details."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from opt.errors import OptError
from opt.models.model import POSITION_OFFSET, OPTModel, build_model, count_parameters
from opt.models.sizes import MODEL_SIZES, ModelArgs, get_model_args
from opt.parallel.compute import use_sparse_embedding_grad

# Published counts (transformers' OPTForCausalLM, tied head counted once).
PUBLISHED = {
    "opt-125m": 125_239_296,
    "opt-350m": 331_196_416,
    "opt-1.3b": 1_315_758_080,
    "opt-2.7b": 2_651_596_800,
    "opt-6.7b": 6_658_473_984,
    "opt-13b": 12_853_473_280,
    "opt-30b": 29_974_540_288,
    "opt-66b": 65_719_701_504,
    "opt-175b": 174_604_468_224,
}
SMALL = ModelArgs(n_layers=3, n_heads=4, d_model=32, vocab_size=97, max_positions=40)
SMALL_350M_STYLE = SMALL.replace(word_embed_dim=16, pre_norm=False)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_parameter_count_matches_published(name):
    assert count_parameters(get_model_args(name)) == PUBLISHED[name]


def test_table_holds_nine_sizes_and_a_tiny_debug_size():
    assert set(MODEL_SIZES) == set(PUBLISHED) | {"opt-tiny"}
    tiny = MODEL_SIZES["opt-tiny"]
    assert count_parameters(tiny) < 5_000_000


@pytest.mark.parametrize("name", list(MODEL_SIZES))
def test_every_size_builds_on_meta_with_opt_architecture(name):
    args = get_model_args(name)
    with torch.device("meta"):
        model = OPTModel(args)
    assert list(model.layers) == [str(i) for i in range(args.n_layers)]
    assert model.embed_positions.num_embeddings == args.max_positions + POSITION_OFFSET
    assert model.layers["0"].ffn.fc1.out_features == 4 * args.d_model
    assert model.layers["0"].ffn.fc1.bias is not None
    assert (model.final_norm is None) == (name == "opt-350m")
    assert (model.project_in is not None) == (name == "opt-350m")


def test_350m_shape_is_post_layernorm_with_projected_512_wide_embeddings():
    args = get_model_args("opt-350m")
    assert not args.pre_norm and args.word_embed_dim == 512
    with torch.device("meta"):
        model = OPTModel(args)
    assert model.embed_tokens.weight.shape == (50272, 512)
    assert model.project_in.weight.shape == (1024, 512) and model.project_in.bias is None
    assert model.project_out.weight.shape == (512, 1024) and model.project_out.bias is None


@pytest.mark.parametrize("args", [SMALL, SMALL_350M_STYLE], ids=["pre-ln", "350m-style"])
def test_forward_gives_logits_and_is_causal(args):
    torch.manual_seed(0)
    model = build_model(args).eval()
    tokens = torch.randint(0, args.vocab_size, (2, 10))
    logits = model(tokens)
    assert logits.shape == (2, 10, args.vocab_size)
    changed = tokens.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % args.vocab_size
    # Changing the future never changes the past.
    torch.testing.assert_close(model(changed)[:, :6], logits[:, :6], rtol=0, atol=0)
    assert not torch.allclose(model(changed)[:, 6:], logits[:, 6:])


def test_output_head_is_tied_to_the_token_embedding():
    model = build_model(SMALL)
    names = [name for name, _ in model.named_parameters()]
    assert not any("lm_head" in n or "output" in n for n in names)
    model.embed_tokens.weight.data.zero_()
    assert torch.count_nonzero(model(torch.tensor([[1, 2, 3]]))) == 0


def test_init_follows_opt_std_and_scales_residual_outputs():
    args = get_model_args("opt-125m")
    torch.manual_seed(0)
    model = build_model(args)
    block = model.layers["0"]
    assert block.attn.q_proj.weight.std().item() == pytest.approx(0.006, rel=0.02)
    out_std = 0.006 / math.sqrt(2 * args.n_layers)
    assert block.ffn.fc2.weight.std().item() == pytest.approx(out_std, rel=0.02)
    assert torch.count_nonzero(block.ffn.fc2.bias) == 0
    assert torch.equal(block.attn_norm.weight, torch.ones(args.d_model))


def test_meta_build_then_init_allocates_only_at_to_empty():
    with torch.device("meta"):
        model = OPTModel(SMALL)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    assert not any(p.is_meta for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_pipeline_stage_is_the_model_with_parts_removed():
    """Running stage 0 (embed + layers 0-1) then stage 1 (layer 2 + head) equals the whole."""
    torch.manual_seed(0)
    full = build_model(SMALL).eval()
    tokens = torch.randint(0, SMALL.vocab_size, (2, 8))
    first = build_model(SMALL).eval()
    last = build_model(SMALL).eval()
    first.load_state_dict(full.state_dict())
    last.load_state_dict(full.state_dict())
    del first.layers["2"]
    first.lm_head = None  # a stage that does not end the model returns hidden states
    del last.layers["0"], last.layers["1"]
    last.embed_positions = None
    torch.testing.assert_close(last(first(tokens)), full(tokens), rtol=0, atol=0)


def test_dropout_is_off_in_eval_and_on_in_train():
    torch.manual_seed(0)
    model = build_model(SMALL.replace(dropout=0.5))
    tokens = torch.randint(0, SMALL.vocab_size, (1, 8))
    model.eval()
    torch.testing.assert_close(model(tokens), model(tokens))
    model.train()
    assert not torch.equal(model(tokens), model(tokens))


def test_too_long_sequence_is_refused():
    model = build_model(SMALL)
    with pytest.raises(OptError, match="max_positions"):
        model(torch.zeros(1, SMALL.max_positions + 1, dtype=torch.long))


def test_bad_shapes_and_names_are_refused():
    with pytest.raises(OptError, match="does not divide"):
        ModelArgs(n_layers=2, n_heads=5, d_model=64)
    with pytest.raises(OptError, match="did you mean opt-125m"):
        get_model_args("opt-125")


def test_model_code_imports_nothing_from_torch_distributed():
    import ast

    for name in ("model.py", "sizes.py"):
        tree = ast.parse((Path(__file__).parents[1] / "opt/models" / name).read_text())
        imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        imported += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not any(m.startswith("torch.distributed") for m in imported), name


@pytest.mark.parametrize("args", [SMALL, SMALL_350M_STYLE], ids=["pre-ln", "350m-style"])
def test_sparse_embedding_gradient_equals_the_dense_one(args):
    """The tied weight's gradient is dense either way and equal to fp32 rounding."""
    torch.manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (2, 12))
    grads = {}
    for sparse in (True, False):
        model = build_model(args)
        model.init_weights(seed=1)
        if sparse:
            use_sparse_embedding_grad(model)
        torch.manual_seed(1)  # the same dropout masks in both runs
        model(tokens).square().mean().backward()
        grads[sparse] = model.embed_tokens.weight.grad
    assert grads[True].layout == torch.strided
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("shape", [{}, {"pre_norm": False, "word_embed_dim": 16}])
def test_packed_examples_compute_what_each_computes_alone(shape):
    """Fine-tuning packs examples into one row: with positions restarting per example and
    attention kept inside each (``segments``), every example's logits and loss are those of
    the example run alone, and padding changes nothing."""
    args = ModelArgs(n_layers=2, n_heads=2, d_model=32, vocab_size=97, max_positions=32,
                     init_std=0.3, **shape)  # fmt: skip
    model = build_model(args, seed=5).eval()
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 7, 3]
    examples = [torch.randint(4, 97, (n,), generator=gen) for n in lengths]
    pad = 4
    tokens = torch.cat([*examples, torch.ones(pad, dtype=torch.long)])[None]
    positions = torch.cat([torch.arange(n) for n in lengths] + [torch.zeros(pad, dtype=torch.long)])
    segments = torch.cat([torch.full((n,), i + 1) for i, n in enumerate(lengths)]
                         + [torch.zeros(pad, dtype=torch.long)])  # fmt: skip
    with torch.no_grad():
        packed = model(tokens, positions=positions[None], segments=segments[None])[0]
        start = 0
        for ids in examples:
            alone = model(ids[None])[0]
            torch.testing.assert_close(
                packed[start : start + len(ids)], alone, rtol=1e-5, atol=1e-5
            )
            start += len(ids)
        # Without the segments the second example would read the first: the mask matters.
        unmasked = model(tokens, positions=positions[None])[0]
        assert not torch.allclose(unmasked[5:12], packed[5:12], atol=1e-3)
