"""Our WanModel against diffusers' WanTransformer3DModel: same perturbed weights, fp32, CPU."""

import dataclasses

import pytest
import torch

from models.wan import WAN_CONFIGS, WanModel
from models.wan_weights import parameter_count
from tests.wan_reference import diffusers_config, ours_from, perturbed_diffusers, rel_err

TINY = WAN_CONFIGS["tiny"]
TINY_TI2V = dataclasses.replace(TINY, in_channels=48, out_channels=48)


def _compare(cfg, latent_shape, t, seed=0):
    ref = perturbed_diffusers(cfg, seed)
    ours = ours_from(ref, cfg)
    g = torch.Generator().manual_seed(seed + 1)
    latents = torch.randn(latent_shape, generator=g)
    context = torch.randn(latent_shape[0], 9, cfg.text_dim, generator=g)
    with torch.no_grad():
        expected = ref(latents, t, context, return_dict=False)[0]
        got = ours(latents, t, context)
    assert got.shape == expected.shape == (latent_shape[0], cfg.out_channels, *latent_shape[2:])
    err = rel_err(got, expected)
    assert err <= 1e-5, err
    return got


def test_tiny_t2v_matches_diffusers():
    _compare(TINY, (1, 4, 4, 8, 8), torch.tensor([731.0]))


def test_tiny_ti2v_per_token_timesteps_match_diffusers():
    # TI2V image conditioning: frame-0 tokens at t=0, all others at t (SPEC §3.6).
    shape = (1, 48, 3, 4, 6)
    tokens_per_frame = (4 // 2) * (6 // 2)
    t = torch.full((1, 3 * tokens_per_frame), 640.0)
    t[:, :tokens_per_frame] = 0.0
    _compare(TINY_TI2V, shape, t)


def test_odd_grid_matches_diffusers():
    _compare(TINY, (1, 4, 3, 6, 10), torch.tensor([999.0]))


def test_batch_of_two_with_different_timesteps():
    got = _compare(TINY, (2, 4, 2, 4, 4), torch.tensor([20.0, 980.0]), seed=3)
    assert not torch.allclose(got[0], got[1])


def test_token_order_is_invisible_to_dense_attention():
    """Running the blocks in a permuted token order (as VSA does) must not change a dense model's output."""
    ref = perturbed_diffusers(TINY)
    ours = ours_from(ref, TINY)
    latents, context = torch.randn(1, 4, 3, 6, 10), torch.randn(1, 5, 32)
    num_tokens = 3 * 3 * 5
    order = torch.randperm(num_tokens)
    meta = type("Meta", (), {"token_order": order, "token_restore": torch.argsort(order)})()
    t = torch.tensor([400.0])
    with torch.no_grad():
        assert rel_err(ours(latents, t, context, attn_meta=meta), ours(latents, t, context)) <= 1e-6


@pytest.mark.parametrize("name", ["wan21_1.3b", "wan21_14b", "wan22_ti2v_5b"])
def test_preset_parameter_counts_equal_diffusers(name):
    from diffusers import WanTransformer3DModel

    cfg = WAN_CONFIGS[name]
    with torch.device("meta"):
        ref = WanTransformer3DModel(**diffusers_config(cfg))
    assert parameter_count(cfg) == sum(p.numel() for p in ref.parameters())


def test_preset_sizes_are_the_published_ones():
    # Published sizes: 1.3B, 14B, 5B parameters (rounded).
    assert round(parameter_count(WAN_CONFIGS["wan21_1.3b"]) / 1e9, 1) == 1.4
    assert round(parameter_count(WAN_CONFIGS["wan21_14b"]) / 1e9) == 14
    assert round(parameter_count(WAN_CONFIGS["wan22_ti2v_5b"]) / 1e9) == 5


def test_latent_size_not_divisible_by_patch_is_rejected():
    model = WanModel(TINY)
    with pytest.raises(ValueError, match="latent H=5 is not divisible by the patch size 2"):
        model(torch.randn(1, 4, 2, 5, 4), torch.tensor([1.0]), torch.randn(1, 3, 32))
    with pytest.raises(ValueError, match="expects in_channels=4"):
        model(torch.randn(1, 3, 2, 4, 4), torch.tensor([1.0]), torch.randn(1, 3, 32))
