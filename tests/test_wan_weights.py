"""Checkpoints written by diffusers' own save_pretrained load into WanModel, and ours load into diffusers."""

import json

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file, save_file

from models.wan import WAN_CONFIGS, WanModel, config_with
from models.wan_weights import GATE_KEY, export_pretrained, load_pretrained
from tests.wan_reference import perturbed_diffusers, rel_err

TINY = WAN_CONFIGS["tiny"]


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, 3, 6, 10, generator=g), torch.tensor([300.0]), torch.randn(1, 7, 32, generator=g)


def _ref_out(ref):
    latents, t, context = _inputs()
    with torch.no_grad():
        return ref(latents, t, context, return_dict=False)[0]


def _our_out(model):
    with torch.no_grad():
        return model(*_inputs())


@pytest.fixture(scope="module")
def ref():
    return perturbed_diffusers(TINY, seed=5)


@pytest.mark.parametrize("shard", [None, "30KB"])
def test_diffusers_save_pretrained_loads_identically(ref, tmp_path, shard):
    kwargs = {"max_shard_size": shard} if shard else {}
    ref.save_pretrained(tmp_path, safe_serialization=True, **kwargs)
    if shard:
        assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").exists()
    model = load_pretrained(tmp_path)
    assert not model.cfg.vsa_gate
    assert torch.equal(_our_out(model), _our_out(load_pretrained(tmp_path)))
    assert rel_err(_our_out(model), _ref_out(ref)) == 0.0 or rel_err(_our_out(model), _ref_out(ref)) <= 1e-6


def test_pipeline_root_layout_loads(ref, tmp_path):
    ref.save_pretrained(tmp_path / "transformer")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    model = load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert rel_err(_our_out(load_pretrained(tmp_path)), _ref_out(ref)) <= 1e-6


@pytest.mark.parametrize("shard_bytes", [2**40, 40_000])
def test_export_loads_in_diffusers(ref, tmp_path, shard_bytes):
    ref.save_pretrained(tmp_path / "src")
    model = load_pretrained(tmp_path / "src")
    export_pretrained(model, tmp_path / "out", max_shard_bytes=shard_bytes)
    back = WanTransformer3DModel.from_pretrained(tmp_path / "out").float().eval()
    assert rel_err(_ref_out(back), _our_out(model)) <= 1e-6
    # Export replaces an existing folder atomically (no stale shards left behind).
    export_pretrained(model, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors"]


def test_vsa_gate_zero_initialised_when_checkpoint_lacks_it_and_kept_when_present(ref, tmp_path):
    ref.save_pretrained(tmp_path / "base")
    gated = load_pretrained(tmp_path / "base", vsa_gate=True)
    gates = [b.attn1.to_gate_compress for b in gated.blocks]
    assert all(g.weight.abs().sum() == 0 and g.bias.abs().sum() == 0 for g in gates)
    # Without VSA metadata the gate is unused: same output as the ungated model.
    assert torch.equal(_our_out(gated), _our_out(load_pretrained(tmp_path / "base")))
    with torch.no_grad():
        for g in gates:
            g.weight.normal_()
    export_pretrained(gated, tmp_path / "gated")
    back = load_pretrained(tmp_path / "gated")  # auto-detects the gate from the keys
    assert back.cfg.vsa_gate
    assert torch.equal(back.blocks[1].attn1.to_gate_compress.weight, gates[1].weight)
    keys = load_file(tmp_path / "gated" / "diffusion_pytorch_model.safetensors").keys()
    assert sum(bool(GATE_KEY.match(k)) for k in keys) == 2 * TINY.num_layers


# ---- bad input: one clear error each ----

def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="neither config.json nor transformer/config.json"):
        load_pretrained(tmp_path)


def test_missing_shard(ref, tmp_path):
    ref.save_pretrained(tmp_path, max_shard_size="30KB")
    shard = sorted(tmp_path.glob("*-of-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        load_pretrained(tmp_path)


def _rewrite(tmp_path, ref, edit):
    ref.save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path)


def test_unexpected_and_missing_keys_are_named(ref, tmp_path):
    def edit(state):
        state["blocks.0.attn1.bogus.weight"] = torch.zeros(1)
        del state["blocks.1.ffn.net.2.weight"]
        for i in range(12):
            state[f"extra.{i}"] = torch.zeros(1)

    _rewrite(tmp_path, ref, edit)
    with pytest.raises(ValueError) as e:
        load_pretrained(tmp_path)
    msg = str(e.value)
    assert "unexpected keys (13)" in msg and "blocks.0.attn1.bogus.weight" in msg and "(+3 more)" in msg
    assert "missing keys (1): blocks.1.ffn.net.2.weight" in msg


def test_shape_mismatch_is_named(ref, tmp_path):
    def edit(state):
        state["blocks.0.attn2.to_k.weight"] = torch.zeros(64, 65)

    _rewrite(tmp_path, ref, edit)
    with pytest.raises(ValueError, match=r"blocks.0.attn2.to_k.weight \(64, 65\) \(model expects \(64, 64\)\)"):
        load_pretrained(tmp_path)


def test_meta_build_and_random_init():
    with torch.device("meta"):
        model = WanModel(config_with(TINY, vsa_gate=True))
    model.to_empty(device="cpu")
    model.init_weights()
    out = _our_out(model)
    assert torch.isfinite(out).all() and out.abs().sum() > 0
    assert model.blocks[0].attn1.to_gate_compress.weight.abs().sum() == 0
    with pytest.raises(ValueError, match="unknown WanConfig field"):
        config_with(TINY, heads=3)
