"""Hugging Face transformers interop: same parameter counts, same logits, exact round trips."""

from __future__ import annotations

import argparse
import json
import os

# Nothing may come from the hub; set before transformers (and huggingface_hub) is imported.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from helpers import HF_VARIANTS, SMALL_HF, import_or_skip_group
from safetensors import safe_open
from safetensors.torch import save_file

from opt.checkpoint import load_model_args, load_model_weights, save_checkpoint
from opt.cli import convert as cli
from opt.convert.hf import (
    args_from_hf_config,
    from_hf,
    hf_config_from_args,
    hf_key_to_ours,
    our_key_to_hf,
    to_hf,
)
from opt.errors import OptError
from opt.models.model import OPTModel, build_model, count_parameters
from opt.models.sizes import MODEL_SIZES, ModelArgs

transformers = import_or_skip_group("transformers", "the transformers parity tests")

SMALL, VARIANTS = SMALL_HF, HF_VARIANTS
TOKENIZER = b'{"version": "1.0", "model": {"type": "BPE"}}'


@pytest.fixture(scope="module", autouse=True)
def quiet_transformers():
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    yield
    transformers.utils.logging.enable_progress_bar()
    transformers.logging.set_verbosity(verbosity)


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial biases and LayerNorm affines, which both libraries' inits leave at 0/1."""
    gen = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.add_(0.05 * torch.randn(param.shape, generator=gen))


def _hf_model(variant: str, seed: int = 0):
    config = transformers.OPTConfig(**SMALL, **VARIANTS[variant])
    torch.manual_seed(seed)
    model = transformers.OPTForCausalLM(config)
    _randomize(model, seed)
    return model.eval()


def _tokens(vocab: int = SMALL["vocab_size"]) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens).logits


def _our_model(ckpt) -> OPTModel:
    model = OPTModel(load_model_args(ckpt))
    load_model_weights(ckpt, model)
    return model.eval()


def _read_safetensors(path) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118


@pytest.fixture(scope="module", params=list(VARIANTS))
def hf_dir(request, tmp_path_factory):
    """A transformers save_pretrained directory, with a tokenizer file beside it."""
    path = tmp_path_factory.mktemp(f"hf_{request.param}") / "model"
    _hf_model(request.param).save_pretrained(path)
    (path / "tokenizer.json").write_bytes(TOKENIZER)
    return path


# --- shapes and configs -------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODEL_SIZES))
def test_parameter_count_matches_transformers(name):
    args = MODEL_SIZES[name]
    with torch.device("meta"):
        model = transformers.OPTForCausalLM(transformers.OPTConfig(**hf_config_from_args(args)))
    # Tied: parameters() yields the shared embedding once, so lm_head is not counted twice.
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == count_parameters(args)


@pytest.mark.parametrize("name", list(MODEL_SIZES))
def test_config_round_trip(name):
    args = MODEL_SIZES[name]
    assert args_from_hf_config(hf_config_from_args(args)) == args


def test_config_matches_transformers_reading():
    """What transformers makes of our config.json is what we wrote."""
    cfg = hf_config_from_args(MODEL_SIZES["opt-350m"])
    parsed = transformers.OPTConfig(**cfg)
    for key in ("hidden_size", "ffn_dim", "word_embed_proj_dim", "do_layer_norm_before"):
        assert getattr(parsed, key) == cfg[key]
    assert args_from_hf_config(parsed.to_dict()) == MODEL_SIZES["opt-350m"]


def test_key_mapping_is_a_bijection():
    with torch.device("meta"):
        keys = OPTModel(
            ModelArgs(n_layers=2, n_heads=4, d_model=64, word_embed_dim=32)
        ).state_dict()
    hf_keys = {our_key_to_hf(key) for key in keys}
    assert len(hf_keys) == len(keys)
    assert (
        our_key_to_hf("layers.1.ffn_norm.weight")
        == "model.decoder.layers.1.final_layer_norm.weight"
    )
    assert {hf_key_to_ours(key) for key in hf_keys} == set(keys)
    assert hf_key_to_ours("decoder.layers.0.fc1.bias") == "layers.0.ffn.fc1.bias"
    assert hf_key_to_ours("model.decoder.layers.0.mystery.weight") is None


# --- logits parity ------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_from_hf_logits_match(variant, tmp_path):
    hf = _hf_model(variant)
    hf.save_pretrained(tmp_path / "hf")
    from_hf(tmp_path / "hf", tmp_path / "ckpt")
    tokens = _tokens()
    ours = _our_model(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), _hf_logits(hf, tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_to_hf_logits_match(variant, tmp_path):
    cfg = {**SMALL, **VARIANTS[variant]}
    args = args_from_hf_config({"model_type": "opt", **cfg})
    torch.manual_seed(3)
    ours = build_model(args)
    _randomize(ours, 3)
    save_checkpoint(tmp_path / "ckpt", model=ours, model_args=args)
    to_hf(tmp_path / "ckpt", tmp_path / "hf")

    hf, info = transformers.OPTForCausalLM.from_pretrained(
        tmp_path / "hf", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # We omit lm_head.weight; transformers must re-tie it rather than leave it random.
    assert hf.lm_head.weight.data_ptr() == hf.model.decoder.embed_tokens.weight.data_ptr()
    assert hf.dtype == torch.float32
    tokens = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(
            _hf_logits(hf.eval(), tokens), ours.eval()(tokens), atol=1e-5, rtol=1e-5
        )


def test_round_trip_reproduces_identical_tensors(hf_dir, tmp_path):
    from_hf(hf_dir, tmp_path / "ckpt")
    to_hf(tmp_path / "ckpt", tmp_path / "out")
    original = _read_safetensors(hf_dir / "model.safetensors")
    original.pop("lm_head.weight", None)
    exported = _read_safetensors(tmp_path / "out" / "model.safetensors")
    assert exported.keys() == original.keys()
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor), key
    # The tokenizer travels HF -> checkpoint (in its manifest) -> HF.
    assert (tmp_path / "ckpt" / "tokenizer.json").read_bytes() == TOKENIZER
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == TOKENIZER
    # safetensors writes 0600; the export must be as readable as the config beside it.
    mode = (tmp_path / "out" / "config.json").stat().st_mode
    assert (tmp_path / "out" / "model.safetensors").stat().st_mode == mode
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert args_from_hf_config(config) == args_from_hf_config(
        json.loads((hf_dir / "config.json").read_text())
    )


# --- other transformers layouts -----------------------------------------------------------


def test_from_hf_sharded(tmp_path):
    hf = _hf_model("pre_ln")
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    from_hf(tmp_path / "hf", tmp_path / "ckpt")
    tokens = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(
            _our_model(tmp_path / "ckpt")(tokens), _hf_logits(hf, tokens), atol=1e-5, rtol=1e-5
        )


def test_from_hf_upcasts_half_precision(tmp_path):
    """The facebook/opt uploads are fp16; we train from fp32 copies of the same values."""
    hf = _hf_model("pre_ln").half()
    hf.save_pretrained(tmp_path / "hf")
    from_hf(tmp_path / "hf", tmp_path / "ckpt")
    ours = _our_model(tmp_path / "ckpt")
    assert ours.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(ours.embed_tokens.weight, hf.model.decoder.embed_tokens.weight.float())
    assert torch.equal(
        ours.layers["2"].ffn_norm.bias, hf.model.decoder.layers[2].final_layer_norm.bias.float()
    )


def _write_facebook_style(hf_dir, lm_head: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Keys as the original facebook/opt uploads have them ("decoder.…"), optional lm_head."""
    hf_dir.mkdir()
    model = _hf_model("pre_ln")
    model.config.to_json_file(hf_dir / "config.json")
    state = {
        key.removeprefix("model."): value.clone()
        for key, value in model.state_dict().items()
        if key != "lm_head.weight"
    }
    if lm_head is not None:
        state["lm_head.weight"] = lm_head
    save_file(state, hf_dir / "model.safetensors")
    return state


def test_from_hf_accepts_unprefixed_keys_and_tied_lm_head(tmp_path):
    state = _write_facebook_style(tmp_path / "hf", lm_head=None)
    lm_head = state["decoder.embed_tokens.weight"].clone()
    save_file({**state, "lm_head.weight": lm_head}, tmp_path / "hf" / "model.safetensors")
    from_hf(tmp_path / "hf", tmp_path / "ckpt")
    ours = _our_model(tmp_path / "ckpt")
    assert torch.equal(ours.embed_tokens.weight, lm_head)


def test_from_hf_refuses_untied_lm_head(tmp_path):
    _write_facebook_style(tmp_path / "hf", lm_head=torch.zeros(500, 64))
    with pytest.raises(OptError, match="untied lm_head not supported"):
        from_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


# --- errors -------------------------------------------------------------------------------


def test_missing_config_json(tmp_path):
    (tmp_path / "hf").mkdir()
    with pytest.raises(OptError, match=r"no config\.json"):
        from_hf(tmp_path / "hf", tmp_path / "ckpt")


def test_pickle_weights_are_refused(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "opt", **SMALL}))
    (hf / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(OptError, match="only safetensors"):
        from_hf(hf, tmp_path / "ckpt")


def test_truncated_safetensors_is_refused(hf_dir, tmp_path):
    bad = tmp_path / "hf"
    bad.mkdir()
    (bad / "config.json").write_bytes((hf_dir / "config.json").read_bytes())
    (bad / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(OptError, match=r"cannot read .*model\.safetensors"):
        from_hf(bad, tmp_path / "ckpt")


def test_corrupt_checkpoint_is_refused(hf_dir, tmp_path):
    from_hf(hf_dir, tmp_path / "ckpt")
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    shard = next(name for name in manifest["files"] if name.endswith(".distcp"))
    data = bytearray((tmp_path / "ckpt" / shard).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "ckpt" / shard).write_bytes(bytes(data))
    with pytest.raises(OptError, match="fails its checksum"):
        to_hf(tmp_path / "ckpt", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_to_hf_failure_leaves_nothing(hf_dir, tmp_path, monkeypatch):
    from_hf(hf_dir, tmp_path / "ckpt")

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("opt.convert.hf.save_file", disk_full)
    with pytest.raises(OSError):
        to_hf(tmp_path / "ckpt", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"activation_function": "gelu"}, "activation_function must be relu"),
        ({"enable_bias": False}, "enable_bias"),
        ({"layer_norm_elementwise_affine": False}, "layer_norm_elementwise_affine"),
        ({"_remove_final_layer_norm": True}, "_remove_final_layer_norm"),
        ({"tie_word_embeddings": False}, "tie_word_embeddings"),
        ({"layerdrop": 0.1}, "layerdrop"),
        ({"model_type": "gpt2"}, "only 'opt'"),
        ({"hidden_size": "64"}, "hidden_size has an invalid value"),
    ],
)
def test_unsupported_configs_are_refused(change, message):
    with pytest.raises(OptError, match=message):
        args_from_hf_config({"model_type": "opt", **SMALL, **change})


def test_remove_final_layer_norm_is_harmless_for_post_ln():
    cfg = {"model_type": "opt", **SMALL, **VARIANTS["350m_like"], "_remove_final_layer_norm": True}
    assert not args_from_hf_config(cfg).pre_norm


def test_unsupported_activation_in_a_model_dir(hf_dir, tmp_path):
    config = json.loads((hf_dir / "config.json").read_text())
    bad = tmp_path / "hf"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**config, "activation_function": "gelu"}))
    (bad / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes())
    with pytest.raises(OptError, match="unsupported OPT variant"):
        from_hf(bad, tmp_path / "ckpt")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("decoder.layers.2.fc1.bias"), "lacks .*decoder.layers.2.fc1.bias"),
        (lambda s: s.update(extra=torch.zeros(1)), "no place for: extra"),
        (lambda s: s.update({"decoder.layers.0.fc1.weight": torch.zeros(128, 64)}), "shape"),
        (
            lambda s: s.update({"model.decoder.embed_positions.weight": torch.zeros(66, 64)}),
            "no place",
        ),
        (
            lambda s: s.update({"decoder.layers.0.fc1.bias": torch.zeros(256, dtype=torch.int8)}),
            "dtype I8",
        ),
    ],
)
def test_weight_mismatches_are_refused(tmp_path, edit, message):
    state = _write_facebook_style(tmp_path / "hf", lm_head=None)
    edit(state)
    save_file(state, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(OptError, match=message):
        from_hf(tmp_path / "hf", tmp_path / "ckpt")


def test_existing_output_directories_are_refused(hf_dir, tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "keep.txt").write_text("precious")
    with pytest.raises(OptError, match="not empty"):
        from_hf(hf_dir, tmp_path / "ckpt")
    with pytest.raises(OptError, match="not empty"):
        to_hf(tmp_path / "ckpt", hf_dir)


# --- command line -------------------------------------------------------------------------


def test_cli_round_trip(hf_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="opt")
    cli.register(parser.add_subparsers(dest="command", required=True))
    for argv in (
        ["convert", "from-hf", str(hf_dir), str(tmp_path / "ckpt")],
        ["convert", "to-hf", str(tmp_path / "ckpt"), str(tmp_path / "out")],
    ):
        args = parser.parse_args(argv)
        assert args.func(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"converted {hf_dir} -> {tmp_path / 'ckpt'} (3 layers")
    assert (tmp_path / "out" / "model.safetensors").is_file()
