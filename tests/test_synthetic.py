"""The toy dataset is deterministic, balanced and decodable; the evaluation separates data from degraded data."""

import torch
import torch.nn.functional as F

from data.synthetic import (DIRECTIONS, ToySpec, all_factors, clip_feature_groups, clip_features, clips_to_rgb,
                            decode_factors, encode_captions, evaluate_samples, frechet_distance, frechet_mean_term,
                            make_clips, make_split, motion_coherence, negative_context, num_captions, shuffle_frames,
                            temporal_features)

SPEC = ToySpec()


def test_deterministic_and_balanced():
    a, b = make_clips(48, SPEC, seed=3), make_clips(48, SPEC, seed=3)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.context, b.context)
    assert a.latents.shape == (48, SPEC.channels, SPEC.frames, SPEC.height, SPEC.width)
    assert a.context.shape == (48, SPEC.text_len, SPEC.text_dim)
    # every caption exactly 4 times (12 captions); every direction of motion occurs
    assert num_captions() == 12
    counts = torch.zeros(12)
    for f in a.factors:
        counts[((all_factors() == f).all(dim=1)).nonzero()] += 1
    assert torch.equal(counts, torch.full((12,), 4.0))
    assert set(a.directions.tolist()) == set(range(len(DIRECTIONS)))
    train, heldout = make_split(SPEC, 24, 24, seed=3)
    assert not torch.allclose(train.latents.sort(0).values, heldout.latents.sort(0).values)


def test_captions_are_text_like_and_negative_is_zero():
    f = all_factors()
    ctx = encode_captions(f, SPEC)
    assert len({tuple(c.flatten().tolist()) for c in ctx}) == 12  # distinct per caption
    same_colour = f[:, 0] == f[0, 0]
    assert torch.equal(ctx[same_colour, 0], ctx[0, 0].expand(int(same_colour.sum()), -1))  # shared "word"
    assert ctx[:, 3:].abs().sum() == 0
    assert negative_context(SPEC, 2).abs().sum() == 0


def test_analyser_reads_the_rendered_factors():
    clips = make_clips(240, SPEC, seed=4)
    assert torch.equal(decode_factors(clips.latents), clips.factors)
    # brightness and size are read independently: a bright clip scaled to dim height is dim and keeps its size
    bright = clips.factors[:, 1] == 1
    dimmed = decode_factors(clips.latents[bright] * 0.45)
    assert (dimmed[:, 1] == 0).all() and torch.equal(dimmed[:, 2], clips.factors[bright, 2])
    # every clip moves the full travel; a clip whose frames all repeat the first one does not move
    assert motion_coherence(clips.latents, SPEC.travel).all()
    frozen = clips.latents[:, :, :1].expand_as(clips.latents)
    assert not motion_coherence(frozen, SPEC.travel).any()


def test_frechet_separates_data_from_degraded_data():
    train, heldout = make_split(SPEC, 256, 256, seed=5)
    fresh = evaluate_samples(train.latents, train.factors, heldout)
    blurred = F.avg_pool3d(train.latents, (1, 7, 7), 1, (0, 3, 3))
    assert fresh["cond_acc"] == 1.0 and fresh["motion"] == 1.0
    assert evaluate_samples(blurred, train.factors, heldout)["frechet"] > 10 * fresh["frechet"]
    assert evaluate_samples(0.7 * train.latents, train.factors, heldout)["frechet"] > 10 * fresh["frechet"]
    # wrong captions are caught by the accuracy, not the distance
    assert evaluate_samples(train.latents, train.factors.roll(1, 0), heldout)["cond_acc"] < 0.2


def test_frechet_matches_closed_form_for_gaussians():
    g = torch.Generator().manual_seed(6)
    ref = torch.randn(200_000, 2, generator=g)
    x = torch.randn(200_000, 2, generator=g) * 2 + torch.tensor([1.0, 0.0])
    # standardised reference ≈ N(0, I); x ≈ N((1, 0), 4I): |Δμ|² + tr(4I + I − 2·2I) = 1 + 2
    assert abs(frechet_distance(x, ref) - 3.0) < 0.05
    assert clip_features(make_clips(4, SPEC, 0).latents).shape == (4, 5 * SPEC.frames + 5)


def test_temporal_features_of_static_and_shifted_clips():
    """Analytic cases: a static clip has no frame-to-frame change; a clip whose frames are the first one rolled by a
    known (dy, dx) per frame has exactly that centroid step and no change of spread, peak or mass."""
    spec = ToySpec(frames=3)
    first = make_clips(8, spec, seed=7).latents[:, :, :1]  # (8, C, 1, H, W), blobs within 13 px of the centre
    static = first.expand(-1, -1, 3, -1, -1)
    assert torch.equal(temporal_features(static, travel=10.0), torch.zeros(8, 12))
    dy, dx = 2, -3
    moved = torch.cat([first.roll((k * dy, k * dx), dims=(3, 4)) for k in range(3)], dim=2)  # (8, C, 3, H, W)
    f = temporal_features(moved, travel=10.0).view(8, 2, 6)  # (N, pairs, features)
    expected = torch.tensor([dy / 10, dx / 10, (dy**2 + dx**2) ** 0.5 / 10, 0.0, 0.0, 0.0])
    torch.testing.assert_close(f, expected.expand(8, 2, 6), atol=2e-3, rtol=0)  # blob tails cut at the border


def test_temporal_distance_and_chance_motion_separate_moving_unrelated_and_frozen_clips():
    train, heldout = make_split(SPEC, 240, 240, seed=8)
    frozen = train.latents[:, :, :1].expand_as(train.latents)
    scores = {name: evaluate_samples(x, train.factors, heldout) for name, x in
              (("data", train.latents), ("unrelated", shuffle_frames(train.latents)), ("frozen", frozen))}
    assert scores["data"]["temporal"] < 0.05 and scores["data"]["motion"] == 1.0
    # frozen: the step (0, 0) and speed 0 against steps of length 1 in four directions: |Δμ|² = 1, tr = 1 -> 2
    assert abs(scores["frozen"]["temporal"] - 2.0) < 0.1 and scores["frozen"]["motion"] == 0.0
    assert 0.3 < scores["unrelated"]["temporal"] < 1.5
    # unrelated frames move "right" by chance only; a clip's own frames always, frozen ones never
    for name in scores:
        assert 0.3 < scores[name]["motion_chance"] < 0.7
    assert abs(scores["unrelated"]["motion"] - scores["unrelated"]["motion_chance"]) < 0.15


def test_texture_is_one_on_data_and_adds_the_filters_share_of_pixel_noise():
    """texture: the data's own fine detail scores 1 against held-out data; white noise of std s adds the high-pass
    filter's energy gain (1 − 4/16)² + (36 − 16)/256 = 164/256 times s² to each clip's mean square; a blur lowers it."""
    from data.synthetic import texture

    train, heldout = make_split(SPEC, 240, 240, seed=8)
    assert abs(evaluate_samples(train.latents, train.factors, heldout)["texture"] - 1) < 0.05
    base = texture(train.latents).square().mean()
    g = torch.Generator().manual_seed(0)
    for s in (0.1, 0.3):
        noisy = train.latents + s * torch.randn(train.latents.shape, generator=g)
        torch.testing.assert_close(texture(noisy).square().mean(), base + 164 / 256 * s**2, rtol=0.05, atol=0)
    smooth = F.avg_pool2d(train.latents.flatten(1, 2), 3, stride=1, padding=1).reshape(train.latents.shape)
    assert evaluate_samples(smooth, train.factors, heldout)["texture"] < 0.9  # 0.83: a blurred Gaussian is smoother


def test_rgb_visualisation_shape():
    frames = clips_to_rgb(make_clips(12, SPEC, 0).latents, scale=2)  # all 12 captions, bright ones among them
    assert frames.shape == (12, SPEC.frames, 2 * SPEC.height, 2 * SPEC.width, 3) and frames.dtype == torch.uint8
    assert frames.max() > 200 and frames.min() == 0


def test_direction_variant_captions_and_decoder_agree():
    """The direction variant (the toy's first design): its captions and its decoder agree on its data."""
    from data.synthetic import decode_direction_factors, make_direction_clips

    clips = make_direction_clips(48, SPEC, 0)
    assert torch.equal(decode_direction_factors(clips.latents), clips.factors)
    assert (clips.factors[:, 1] == clips.directions).all() and len(set(clips.directions.tolist())) == 4


def test_factor_probe_script_runs_both_variants():
    """scripts/probe_toy_factors.py (the sweep behind the toy's choice of factors): a 2-step run prints one JSON row
    per factor variant with an accuracy per factor."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "probe_toy_factors.py"
    for factor, extra in (("brightness", ["dirs=1"]), ("direction", [])):
        proc = subprocess.run([sys.executable, str(script), "--factor", factor, "--steps", "2", "--num-eval", "4",
                               "--sample-steps", "2", "--set", "dim=24", "ffn=32", *extra], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        assert [r["step"] for r in rows] == [2] and rows[0]["factor"] == factor and len(rows[0]["accuracy"]) == 3
        assert all(0 <= a <= 1 for a in rows[0]["accuracy"]) and rows[0]["frechet"] >= 0
        assert 0 <= rows[0]["motion_chance"] <= 1 and rows[0]["temporal"] >= 0  # issue 25's motion columns
        assert rows[0]["dirs"] == (1 if extra else 4)


def test_distance_parts_locate_a_known_error():
    """`evaluate_samples`' parts name the error put in: pixel noise goes away when blurred, a brightness change is a
    shape error, a moved blob a position error, and a shifted feature mean is the mean term."""
    train, heldout = make_split(SPEC, 256, 256, seed=9)
    fresh = evaluate_samples(train.latents, train.factors, heldout)
    assert abs(fresh["frechet_blur"] - fresh["frechet"]) < 0.1 * fresh["frechet"]  # smooth clips: blur changes little
    noise = 0.3 * torch.randn(train.latents.shape, generator=torch.Generator().manual_seed(10))
    noisy = evaluate_samples(train.latents + noise, train.factors, heldout)
    assert noisy["frechet"] > 5 * fresh["frechet"] and noisy["frechet_blur"] < 0.3 * noisy["frechet"]
    dim = evaluate_samples(0.8 * train.latents, train.factors, heldout)
    assert dim["frechet_shape"] > 100 * fresh["frechet_shape"]
    assert dim["frechet_position"] < 2 * fresh["frechet_position"]
    moved = evaluate_samples(train.latents.roll(3, dims=4), train.factors, heldout)  # 3 px right, inside the frame
    assert moved["frechet_position"] > 5 * fresh["frechet_position"]
    assert moved["frechet_shape"] < 0.1 * moved["frechet_position"]
    assert sum(map(len, clip_feature_groups(SPEC.frames).values())) == 5 * SPEC.frames + 5
    g = torch.Generator().manual_seed(11)
    ref = torch.randn(100_000, 3, generator=g)
    x = torch.randn(100_000, 3, generator=g) * 2 + torch.tensor([1.0, 0.0, 0.0])
    assert abs(frechet_mean_term(x, ref) - 1.0) < 0.05  # |Δμ|² only; the total is 1 + 3·(2 − 1)² = 4
    assert abs(frechet_distance(x, ref) - 4.0) < 0.1
