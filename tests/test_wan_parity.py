"""Our WanModel against diffusers' WanTransformer3DModel: same perturbed weights, fp32, CPU."""

import dataclasses

import pytest
import torch

from attention.sdpa import sdpa_attention
from models.wan import WAN_CONFIGS, WanModel
from models.wan_weights import parameter_count
from tests.wan_reference import diffusers_config, ours_from, perturbed_diffusers, rel_err

TINY = WAN_CONFIGS["tiny"]
TINY_TI2V = dataclasses.replace(TINY, in_channels=48, out_channels=48)
# I2V: noise (4) + mask (4) + image latent (4) in, noise width out; with CLIP tokens of width 24 (Wan2.1-I2V) or
# without (Wan2.2-I2V-A14B).
TINY_I2V = dataclasses.replace(TINY, in_channels=12, out_channels=4, image_dim=24)
TINY_I2V_NO_CLIP = dataclasses.replace(TINY, in_channels=12, out_channels=4)
# diffusers splits text from image tokens by a hard-coded text length of 512 (WanAttnProcessor).
TEXT_LEN_DIFFUSERS = 512


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
    # TI2V image conditioning: frame-0 tokens at t=0, all others at t (docs/METHOD.md §3.6).
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


def _recording(attn_fn, seen: list):
    def attn(q, k, v, meta=None, gate=None):
        seen.append(q.detach().clone())  # (B, L, H, Dh), after RoPE
        return attn_fn(q, k, v, meta=meta, gate=gate)

    return attn


def _causal(q, k, v, meta=None, gate=None):
    """An attention that depends on the token order: token i sees tokens 0..i of the order it is given."""
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           is_causal=True)
    return out.transpose(1, 2)


@pytest.mark.parametrize("cfg, shape, per_token",
                         [(TINY, (1, 4, 3, 6, 10), False), (TINY_TI2V, (1, 48, 3, 6, 10), True)])
def test_token_order_reaches_attention_and_is_restored(cfg, shape, per_token):
    """Running the blocks in a permuted token order (as VSA does): the attention receives the raster-order tokens
    permuted, RoPE phases included (q after RoPE equals the raster run's q, permuted); an order-dependent (causal)
    attention therefore gives a different output, so the permutation is not silently skipped; dense attention gives
    the raster-order output back, per-token timesteps (TI2V, frame 0 at t = 0) included."""
    ref = perturbed_diffusers(cfg)
    g = torch.Generator().manual_seed(4)
    latents, context = torch.randn(shape, generator=g), torch.randn(1, 5, 32, generator=g)
    num_tokens = 3 * 3 * 5
    order = torch.randperm(num_tokens, generator=g)
    meta = type("Meta", (), {"token_order": order, "token_restore": torch.argsort(order)})()
    t = torch.tensor([400.0])
    if per_token:
        t = torch.full((1, num_tokens), 400.0)
        t[:, : 3 * 5] = 0.0
    raster_q, permuted_q = [], []
    raster_model = ours_from(ref, cfg, attn_fn=_recording(sdpa_attention, raster_q))
    permuted_model = ours_from(ref, cfg, attn_fn=_recording(sdpa_attention, permuted_q))
    with torch.no_grad():
        raster = raster_model(latents, t, context)
        permuted = permuted_model(latents, t, context, attn_meta=meta)
        causal = ours_from(ref, cfg, attn_fn=_causal)
        causal_raster, causal_permuted = causal(latents, t, context), causal(latents, t, context, attn_meta=meta)
    assert len(raster_q) == len(permuted_q) == cfg.num_layers
    torch.testing.assert_close(permuted_q[0], raster_q[0][:, order], rtol=1e-5, atol=1e-6)  # block 0's input
    assert rel_err(permuted, raster) <= 1e-6
    assert rel_err(causal_permuted, causal_raster) > 1e-2  # the order reached the attention


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


def _compare_i2v(cfg, latent_shape, t, image_tokens, seed=0):
    ref = perturbed_diffusers(cfg, seed)
    ours = ours_from(ref, cfg)
    g = torch.Generator().manual_seed(seed + 1)
    latents = torch.randn(latent_shape, generator=g)
    context = torch.randn(latent_shape[0], TEXT_LEN_DIFFUSERS, cfg.text_dim, generator=g)
    image = None if cfg.image_dim is None else torch.randn(latent_shape[0], image_tokens, cfg.image_dim, generator=g)
    with torch.no_grad():
        expected = ref(latents, t, context, encoder_hidden_states_image=image, return_dict=False)[0]
        got = ours(latents, t, context, image_context=image)
    assert got.shape == expected.shape == (latent_shape[0], cfg.out_channels, *latent_shape[2:])
    err = rel_err(got, expected)
    assert err <= 1e-5, err
    return ours, latents, context, image, got


def test_tiny_i2v_with_clip_tokens_matches_diffusers():
    ours, latents, context, image, got = _compare_i2v(TINY_I2V, (2, 12, 3, 4, 6), torch.tensor([640.0, 90.0]), 7)
    # The image tokens matter: other tokens give another output.
    with torch.no_grad():
        other = ours(latents, torch.tensor([640.0, 90.0]), context, image_context=torch.randn_like(image))
    assert rel_err(other, got) > 1e-3


def test_tiny_i2v_without_clip_tokens_matches_diffusers():
    _compare_i2v(TINY_I2V_NO_CLIP, (1, 12, 3, 6, 10), torch.tensor([875.0]), 0, seed=2)


def test_i2v_image_tokens_are_required_exactly_when_configured():
    with_clip, without = WanModel(TINY_I2V), WanModel(TINY_I2V_NO_CLIP)
    latents, t, context = torch.randn(1, 12, 2, 4, 4), torch.tensor([500.0]), torch.randn(1, 3, 32)
    with pytest.raises(ValueError, match=r"needs image_context \(1, L_img, 24\)"):
        with_clip(latents, t, context)
    with pytest.raises(ValueError, match=r"needs image_context .* got \(1, 5, 16\)"):
        with_clip(latents, t, context, image_context=torch.randn(1, 5, 16))
    with pytest.raises(ValueError, match="no image cross-attention"):
        without(latents, t, context, image_context=torch.randn(1, 5, 24))


def test_i2v_weights_round_trip_through_diffusers_files(tmp_path):
    from diffusers import WanTransformer3DModel

    from models.wan_weights import export_pretrained, load_pretrained

    ref = perturbed_diffusers(TINY_I2V, seed=5)
    ref.save_pretrained(tmp_path / "theirs")
    ours = load_pretrained(tmp_path / "theirs", dtype=torch.float32)
    assert ours.cfg == TINY_I2V
    export_pretrained(ours, tmp_path / "ours")
    back = WanTransformer3DModel.from_pretrained(tmp_path / "ours")
    theirs = ref.state_dict()
    assert set(back.state_dict()) == set(theirs)
    assert all(torch.equal(back.state_dict()[k], theirs[k]) for k in theirs)


def test_flf2v_and_inconsistent_image_configs_are_rejected():
    from models.wan import WanConfig

    base = {k: v for k, v in diffusers_config(TINY_I2V).items()}
    with pytest.raises(ValueError, match="pos_embed_seq_len=514 .*FLF2V"):
        WanConfig.from_diffusers({**base, "pos_embed_seq_len": 514})
    with pytest.raises(ValueError, match="added_kv_proj_dim = num_attention_heads \\* attention_head_dim = 64"):
        WanConfig.from_diffusers({**base, "added_kv_proj_dim": 32})
    with pytest.raises(ValueError, match="image_dim=24 with added_kv_proj_dim=None"):
        WanConfig.from_diffusers({**base, "added_kv_proj_dim": None})


# The published transformer config.json values (Wan-AI/*-Diffusers), written out so the presets are checked against
# them and not against themselves. Both A14B experts share one config.
PUBLISHED_14B = {"patch_size": [1, 2, 2], "num_attention_heads": 40, "attention_head_dim": 128, "text_dim": 4096,
                 "freq_dim": 256, "ffn_dim": 13824, "num_layers": 40, "cross_attn_norm": True,
                 "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024}
PUBLISHED = {
    "wan21_i2v_14b": {**PUBLISHED_14B, "in_channels": 36, "out_channels": 16, "image_dim": 1280,
                      "added_kv_proj_dim": 5120},
    "wan22_t2v_a14b": {**PUBLISHED_14B, "in_channels": 16, "out_channels": 16},
    "wan22_i2v_a14b": {**PUBLISHED_14B, "in_channels": 36, "out_channels": 16},
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_new_presets_equal_the_published_configs_and_counts(name):
    from diffusers import WanTransformer3DModel

    from models.wan import WanConfig

    assert WanConfig.from_diffusers(PUBLISHED[name]) == WAN_CONFIGS[name]
    with torch.device("meta"):
        ref = WanTransformer3DModel(**PUBLISHED[name])
    assert parameter_count(WAN_CONFIGS[name]) == sum(p.numel() for p in ref.parameters())
    # Billions: the A14B per expert; Wan2.1-I2V's "14B" is 16.4B with the image cross-attention (2 x 5120^2 + norm
    # per block) and the CLIP embedder.
    assert round(parameter_count(WAN_CONFIGS[name]) / 1e9, 1) == {"wan21_i2v_14b": 16.4}.get(name, 14.3)
