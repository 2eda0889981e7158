"""A toy text-to-video latent dataset with known factors, and the analyser that scores samples against it.

Each clip is one Gaussian blob moving in a straight line through a latent video `(C, T, H, W)`. Three factors come
from the caption: colour (which of channels 0..2 the blob lights up; channel 3 is a shared "luminance"), brightness
(dim / bright) and size (small / large blob). Direction of motion (right, left, down, up), start position and exact
brightness are random per clip, so a caption has a whole distribution of videos (what makes few-step sampling of the
teacher blurry).

Why the direction is not a caption factor: the tiny 2-layer Wan teacher that trains on a CPU in minutes never learned
it. Measured 2026-11-27 on GPUs (31 variants of width, heads, depth, frames, travel, jitter, timestep shift, learning
rate and batch, 12 000-24 000 steps each, 6-12x the demo's): direction accuracy stayed at chance (0.17-0.35 of 4) and
the two frames' blobs stayed uncoupled, while colour, brightness and size reached 98-100 % within 2000-3000 steps.
Motion stays in the data, and `evaluate_samples` reports how much of it the samples keep ("motion").
`scripts/probe_toy_factors.py --factor direction` re-runs that experiment on `make_direction_clips`.
The demo teacher's frames are unrelated (measured 2026-12-02, tests/assets/toy_teacher, 96 held-out captions,
teacher-50: motion 41.7 %, the same samples with frames shuffled between clips 42.7 %): its "motion" is the chance that
two independently placed blobs lie one travel apart, not motion it learned (issue 25).
The cause is the teacher's capacity, not the data (one H200, 2026-12-03, `scripts/probe_toy_factors.py --factor
brightness --set ...`, 96 captions, motion vs its frames-shuffled chance): on these clips a dim-128, 4-head (head dim
32), 4-layer, FFN-256 teacher couples its frames — motion 0.81 vs chance 0.43, temporal distance 0.16, at 4210 steps
(a second run 0.62 vs 0.42 at 3550; both still rising) — and dim 96 / 4 heads / 3 layers reaches 0.50 vs 0.35 at 4900;
every 2-layer teacher (dim 48-96, 1-4 heads, up to 10 000 steps) and every dim-48 one stays at chance, whatever the
travel (3-10), jitter (3-8), frames (2, 4), shift (1, 3), batch (16, 64) or number of directions (1, 4); head dim 12
breaks the teacher. Such a teacher costs ~10x the demo's per step, beyond a 2-core CPU demo; `scripts/demo.py --large`
runs the demo with it on one GPU. Its students keep its motion (one H200, 2026-12-03, 240 captions, motion vs
frames-shuffled chance): teacher-50 93.8 % (50.0 %), data-mode student-3 94.6 %, data-free 97.5 %, LoRA r8 92.1 %.

A caption is a text-like embedding `(L_txt, D_txt)`: one fixed random "word" vector per factor value in rows 0..2,
zero padding after; the unconditional ("negative") caption is all zeros. Everything is generated from seeds.

Evaluation (`evaluate_samples`): Fréchet distance between hand-designed features of generated and held-out clips
(per-frame blob centroid, spread, peak, mass, per-channel mass, velocity), standardised by the held-out statistics,
conditioning accuracy (colour, brightness and size decoded by `decode_factors` all equal to the caption's), motion
coherence (the blob moves the clip's travel distance between the first and last frame, ±30 %) next to its chance level
(frames shuffled between clips), and a temporal distance: Fréchet distance of frame-to-frame change features (centroid
step, relative change of spread, peak and mass) in units of the travel, which the per-clip distance barely sees.
"""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from losses.flow import teacher_sample

COLOUR_NAMES = ("red", "green", "blue")
BRIGHTNESS_NAMES = ("dim", "bright")
SIZE_NAMES = ("small", "large")
FACTOR_SIZES = (len(COLOUR_NAMES), len(BRIGHTNESS_NAMES), len(SIZE_NAMES))
DIRECTIONS = torch.tensor([[0.0, 1.0], [0.0, -1.0], [1.0, 0.0], [-1.0, 0.0]])  # (dy, dx): right, left, down, up
BLOB_SIGMA = (2.0, 3.5)  # latent pixels, per size
AMPLITUDE = 6.0  # mean blob height of a bright blob in the colour channel (luminance: 0.75 of it)
DIM_SCALE = 0.45  # a dim blob's height relative to a bright one (luminance peaks 1.6-2.4 vs 3.6-5.4)
BRIGHTNESS_SPLIT = 3.0  # luminance peak between the dim and the bright range
BACKGROUND_LEVEL = 0.6  # the analyser's noise floor for moments (dim luminance peaks are >= 1.6)
# Size from the area above half the frame's peak (brightness-independent): 2 pi ln2 sigma^2 = 17 / 53 px for the two
# sizes; split at sigma = 2.75.
SIZE_SPLIT_AREA = 2 * math.pi * math.log(2) * 2.75**2
MOTION_TOLERANCE = 0.3  # motion coherence: |displacement - travel| <= 30 % of travel

@dataclass(frozen=True)
class ToySpec:
    channels: int = 4  # latent channels; >= 4 (0..2 colour, 3 luminance, the rest stay empty)
    frames: int = 2  # latent frames T
    height: int = 32  # latent H
    width: int = 32  # latent W
    text_len: int = 8  # L_txt
    text_dim: int = 32  # D_txt
    travel: float = 10.0  # latent pixels the blob moves over the clip
    jitter: float = 3.0  # start position: uniform within ±jitter latent pixels of the centred path's start


@dataclass
class ToyClips:
    latents: torch.Tensor  # (N, C, T, H, W) float32
    context: torch.Tensor  # (N, L_txt, D_txt) float32 caption embeddings
    factors: torch.Tensor  # (N, 3) int64: colour, brightness, size
    directions: torch.Tensor  # (N,) int64: index into DIRECTIONS (random, not in the caption)


def num_captions() -> int:
    return math.prod(FACTOR_SIZES)


def all_factors() -> torch.Tensor:
    """Every caption's factors, (12, 3) int64, in a fixed order."""
    grids = torch.meshgrid(*(torch.arange(n) for n in FACTOR_SIZES), indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], dim=1)


def caption_name(factors: torch.Tensor) -> str:
    colour, brightness, size = (int(f) for f in factors)
    return f"a {SIZE_NAMES[size]} {BRIGHTNESS_NAMES[brightness]} {COLOUR_NAMES[colour]} blob"


def encode_captions(factors: torch.Tensor, spec: ToySpec, vocab_seed: int = 0) -> torch.Tensor:
    """Caption embeddings (N, L_txt, D_txt) for factors (N, 3): word vectors (fixed by vocab_seed) in rows 0..2."""
    if spec.text_len < 3:
        raise ValueError(f"ToySpec.text_len must be >= 3 (one row per factor), got {spec.text_len}")
    g = torch.Generator().manual_seed(vocab_seed)
    words = [torch.randn(n, spec.text_dim, generator=g) for n in FACTOR_SIZES]  # one table per factor
    context = torch.zeros(factors.shape[0], spec.text_len, spec.text_dim)
    for row, table in enumerate(words):
        context[:, row] = table[factors[:, row]]
    return context


def negative_context(spec: ToySpec, batch: int = 1) -> torch.Tensor:
    """The unconditional caption: all zeros, (batch, L_txt, D_txt)."""
    return torch.zeros(batch, spec.text_len, spec.text_dim)


def render_clips(factors: torch.Tensor, directions: torch.Tensor, spec: ToySpec,
                 generator: torch.Generator) -> torch.Tensor:
    """Latent clips (N, C, T, H, W) for the given factors and directions, random start positions and amplitudes."""
    if spec.channels < 4:
        raise ValueError(f"ToySpec.channels must be >= 4 (3 colour + luminance), got {spec.channels}")
    n, T = factors.shape[0], spec.frames
    sigma = torch.tensor(BLOB_SIGMA)[factors[:, 2]]  # (N,)
    step = DIRECTIONS[directions] * spec.travel  # (N, 2) displacement over the clip
    # the path is centred in the frame, then shifted by a random offset of at most ±jitter pixels per axis
    centre_start = torch.tensor([(spec.height - 1) / 2, (spec.width - 1) / 2]) - step / 2  # (N, 2)
    start = centre_start + spec.jitter * (2 * torch.rand(n, 2, generator=generator) - 1)
    amplitude = AMPLITUDE * (0.8 + 0.4 * torch.rand(n, generator=generator))
    amplitude = amplitude * torch.where(factors[:, 1] == 0, DIM_SCALE, 1.0)
    frac = torch.arange(T) / max(T - 1, 1)  # (T,)
    centre = start[:, None, :] + frac[None, :, None] * step[:, None, :]  # (N, T, 2)
    ys = torch.arange(spec.height, dtype=torch.float32)
    xs = torch.arange(spec.width, dtype=torch.float32)
    dy = ys[None, None, :, None] - centre[..., 0, None, None]  # (N, T, H, 1)
    dx = xs[None, None, None, :] - centre[..., 1, None, None]  # (N, T, 1, W)
    blob = torch.exp(-(dy**2 + dx**2) / (2 * sigma[:, None, None, None] ** 2))  # (N, T, H, W)
    blob = amplitude[:, None, None, None] * blob
    latents = torch.zeros(n, spec.channels, T, spec.height, spec.width)
    latents[torch.arange(n), factors[:, 0]] = blob
    latents[:, 3] = 0.75 * blob
    return latents


def make_clips(num: int, spec: ToySpec, seed: int) -> ToyClips:
    """`num` clips cycling through all 12 captions (balanced), shuffled, fully determined by `seed`."""
    g = torch.Generator().manual_seed(seed)
    factors = all_factors().repeat(num // num_captions() + 1, 1)[:num]
    factors = factors[torch.randperm(num, generator=g)]
    directions = torch.randint(len(DIRECTIONS), (num,), generator=g)
    return ToyClips(render_clips(factors, directions, spec, g), encode_captions(factors, spec), factors, directions)


@torch.no_grad()
def teacher_clips(teacher: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], context: torch.Tensor,
                  clip_shape: tuple[int, ...], shift: float, guidance: float, seed: int, num_steps: int = 50,
                  chunk: int = 48) -> torch.Tensor:
    """Clips (N, C, T, H, W) a teacher `teacher(x, t, context)` generates for captions `context` (N, L_txt, D_txt):
    `num_steps`-step Euler samples with standard CFG `guidance` against the negative (zero) caption, in chunks whose
    noise is seeded `seed + first index`. Prints progress per chunk."""
    n, start, parts = context.shape[0], time.perf_counter(), []
    for i in range(0, n, chunk):
        ctx = context[i:i + chunk]
        noise = torch.randn((ctx.shape[0], *clip_shape), generator=torch.Generator().manual_seed(seed + i))
        noise = noise.to(ctx.device)  # CPU draws: the same clips' noise on any device
        parts.append(teacher_cfg_sample(teacher, ctx, noise, num_steps, shift, guidance))
        print(f"teacher data: {i + ctx.shape[0]}/{n} clips, {time.perf_counter() - start:.0f} s", flush=True)
    return torch.cat(parts)


def teacher_cfg_sample(teacher: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                       context: torch.Tensor, noise: torch.Tensor, num_steps: int, shift: float,
                       guidance: float) -> torch.Tensor:
    """`num_steps`-step Euler samples of `teacher(x, t, context)` from `noise`, standard CFG `guidance` (the recipes'
    DMD2 w + 1) against the toy's negative caption, all zeros (`negative_context`)."""
    negative = torch.zeros_like(context)
    return teacher_sample(lambda x, t: teacher(x, t, context), lambda x, t: teacher(x, t, negative), noise, num_steps,
                          shift, guidance)


def make_split(spec: ToySpec, num_train: int, num_heldout: int, seed: int) -> tuple[ToyClips, ToyClips]:
    """Training clips and a held-out set drawn with an independent seed stream."""
    return make_clips(num_train, spec, seed), make_clips(num_heldout, spec, seed + 1_000_003)


# ------------------------------------------------------------------------------------------------------- analyser


def blob_statistics(latents: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-clip blob measurements from the luminance channel and the colour channels' positive mass. Values below
    BACKGROUND_LEVEL are ignored, so faint background noise does not swamp the moments of the blob."""
    lum = (latents[:, 3].float() - BACKGROUND_LEVEL).clamp(min=0)  # (N, T, H, W)
    N, T, H, W = lum.shape
    mass = lum.sum(dim=(2, 3)) + 1e-6  # (N, T)
    ys = torch.arange(H, dtype=torch.float32)[:, None]
    xs = torch.arange(W, dtype=torch.float32)[None, :]
    cy = (lum * ys).sum(dim=(2, 3)) / mass  # (N, T)
    cx = (lum * xs).sum(dim=(2, 3)) / mass
    var = (lum * ((ys - cy[..., None, None]) ** 2 + (xs - cx[..., None, None]) ** 2)).sum(dim=(2, 3)) / mass
    return {
        "centroid": torch.stack([cy, cx], dim=-1),  # (N, T, 2)
        "spread": var.sqrt(),  # (N, T)
        "peak": lum.amax(dim=(2, 3)),  # (N, T)
        "mass": mass,  # (N, T)
        "channel_mass": (latents[:, :3].float() - BACKGROUND_LEVEL).clamp(min=0).sum(dim=(2, 3, 4)),  # (N, 3)
    }


def decode_factors(latents: torch.Tensor) -> torch.Tensor:
    """Deterministic read-out of (colour, brightness, size) from clips (N, C, T, H, W) -> (N, 3) int64."""
    s = blob_statistics(latents)
    colour = s["channel_mass"].argmax(dim=1)
    lum = latents[:, 3].float()  # (N, T, H, W)
    peak = lum.amax(dim=(2, 3))  # (N, T)
    brightness = (peak.mean(dim=1) > BRIGHTNESS_SPLIT).long()
    half_area = (lum > 0.5 * peak[..., None, None]).sum(dim=(2, 3)).float()  # (N, T) px above half maximum
    size = (half_area.mean(dim=1) > SIZE_SPLIT_AREA).long()
    return torch.stack([colour, brightness, size], dim=1)


def displacement(latents: torch.Tensor) -> torch.Tensor:
    """Blob centroid displacement from the first to the last frame, latent pixels, (N,)."""
    c = blob_statistics(latents)["centroid"]
    return (c[:, -1] - c[:, 0]).norm(dim=1)


def motion_coherence(latents: torch.Tensor, travel: float) -> torch.Tensor:
    """Per clip: does the blob move `travel` latent pixels (±30 %) between the first and the last frame? (N,) bool"""
    return (displacement(latents) - travel).abs() <= MOTION_TOLERANCE * travel


def clip_features(latents: torch.Tensor) -> torch.Tensor:
    """Feature vectors (N, 5T + 5) for the Fréchet distance."""
    s = blob_statistics(latents)
    velocity = s["centroid"][:, -1] - s["centroid"][:, 0]
    parts = [s["centroid"].flatten(1), s["spread"], s["peak"], s["mass"], s["channel_mass"], velocity]
    return torch.cat(parts, dim=1)


def clip_feature_groups(frames: int) -> dict[str, list[int]]:
    """Columns of `clip_features` by what they describe: where the blob is and goes (centroids, velocity), its shape
    (spread, peak, mass per frame) and its colour (per-channel mass). `evaluate_samples` scores each group alone."""
    T = frames
    return {"position": [*range(2 * T), 5 * T + 3, 5 * T + 4], "shape": list(range(2 * T, 5 * T)),
            "colour": list(range(5 * T, 5 * T + 3))}


def temporal_features(latents: torch.Tensor, travel: float) -> torch.Tensor:
    """Frame-to-frame change of the blob, (N, 6·(T − 1)): per consecutive pair the centroid step (dy, dx) and its
    length in units of `travel`, and the relative change (b − a) / (a + b) of spread, peak and mass. All zero for a
    static clip; a clip moving by s pixels per frame has step s / travel and no other change."""
    s = blob_statistics(latents)
    step = (s["centroid"][:, 1:] - s["centroid"][:, :-1]) / travel  # (N, T-1, 2)

    def rel(x: torch.Tensor) -> torch.Tensor:  # (N, T) -> (N, T-1), bounded in [-1, 1]
        return (x[:, 1:] - x[:, :-1]) / (x[:, 1:] + x[:, :-1] + 1e-6)

    parts = [step, step.norm(dim=-1, keepdim=True), *(rel(s[k])[..., None] for k in ("spread", "peak", "mass"))]
    return torch.cat(parts, dim=-1).flatten(1)


def frechet_distance(features: torch.Tensor, reference: torch.Tensor, standardise: bool = True) -> float:
    """Fréchet distance between Gaussian fits of two feature sets, after standardising both with the reference's
    mean and std (so every feature counts in units of its spread in real data). `standardise=False` keeps the
    features' own units (for features that are constant in the data, such as the temporal ones' speed)."""
    a, b = _standardised(features, reference, standardise)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    # tr sqrt(A B) = tr sqrt(B^½ A B^½), symmetric PSD -> eigenvalues
    eval_b, evec_b = torch.linalg.eigh(cov_b)
    sqrt_b = evec_b @ torch.diag(eval_b.clamp(min=0).sqrt()) @ evec_b.T
    cross = torch.linalg.eigvalsh(sqrt_b @ cov_a @ sqrt_b).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross)


def frechet_mean_term(features: torch.Tensor, reference: torch.Tensor) -> float:
    """The mean term |μ_a − μ_b|² of `frechet_distance` (standardised by the reference): the rest of the distance is
    the covariance term, a sampler's spread of the features being too wide, too narrow or wrongly correlated."""
    a, b = _standardised(features, reference)
    return float((a.mean(0) - b.mean(0)).square().sum())


def _standardised(features: torch.Tensor, reference: torch.Tensor,
                  standardise: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Both feature sets in float64, in units of the reference's spread around its mean (as they are: `standardise`
    False)."""
    if not standardise:
        return features.double(), reference.double()
    mu_ref, std_ref = reference.double().mean(0), reference.double().std(0) + 1e-6
    return (features.double() - mu_ref) / std_ref, (reference.double() - mu_ref) / std_ref


def shuffle_frames(latents: torch.Tensor) -> torch.Tensor:
    """Clips (N, C, T, H, W) whose frames 1.. come from the next clip (frame 0 stays): each frame keeps its marginal
    distribution, every dependence between the frames of a clip is gone."""
    out = latents.clone()
    out[:, :, 1:] = latents.roll(1, dims=0)[:, :, 1:]
    return out


def texture(latents: torch.Tensor) -> torch.Tensor:
    """Per clip, the RMS of the luminance's fine detail on the blob, (N,): the luminance minus its 3×3 binomial blur,
    over the pixels whose blurred luminance exceeds 1. A real clip's smooth Gaussian scores only its own curvature; a
    sampler that leaves pixel-scale noise on the blob scores higher (white noise of std s adds 0.64·s² to the square:
    the high-pass filter's energy gain, 164/256)."""
    lum = latents[:, 3:4].float()  # (N, 1, T, H, W)
    blur = binomial_blur(lum)
    fine, on_blob = (lum - blur).flatten(1), (blur > 1.0).flatten(1)
    return ((fine.square() * on_blob).sum(1) / on_blob.sum(1).clamp(min=1)).sqrt()


def binomial_blur(latents: torch.Tensor) -> torch.Tensor:
    """Every frame of every channel of (N, C, T, H, W) blurred by the 3×3 binomial kernel [1 2 1]ᵀ[1 2 1] / 16, edges
    replicated; fp32, same shape. `x − binomial_blur(x)` is the fine detail `texture` and scripts/probe_toy_noise.py
    read: zero on a constant frame, 164/256 of white noise's energy."""
    n, c, t, h, w = latents.shape
    kernel = torch.tensor([1.0, 2.0, 1.0], device=latents.device)
    kernel = (kernel[:, None] * kernel[None, :] / 16).reshape(1, 1, 3, 3)
    flat = latents.float().reshape(n * c * t, 1, h, w)
    blur = torch.nn.functional.conv2d(torch.nn.functional.pad(flat, (1, 1, 1, 1), mode="replicate"), kernel)
    return blur.reshape(n, c, t, h, w)


def evaluate_samples(samples: torch.Tensor, factors: torch.Tensor, heldout: ToyClips) -> dict[str, float]:
    """Scores of generated clips (N, C, T, H, W) against held-out data:
    frechet      distance of per-clip features (`clip_features`, standardised by the held-out spread)
    temporal     distance of frame-to-frame change (`temporal_features`, units of the travel: frozen clips ≈ 2)
    cond_acc     fraction whose decoded factors all match the caption
    motion       fraction that move as far as the held-out clips do (`motion_coherence`; travel = their median)
    motion_chance  `motion` of the same samples with frames shuffled between clips (`shuffle_frames`): what
                 independent frames score. motion ≈ motion_chance means the frames are unrelated; below it, the blob
                 moves less than two independently placed blobs would (frozen).
    texture      the samples' fine detail on the blob (`texture`) relative to the held-out clips': 1 is the data's;
                 pixel noise left on the blob raises it (and with it the peak, mass and spread the distance reads).
    frechet_mean the distance's mean term (`frechet_mean_term`); frechet − frechet_mean is its covariance term
    frechet_blur the distance with samples and held-out clips both blurred by `binomial_blur`: what is left of
                 `frechet` once pixel-scale noise is gone (fresh clips score the same either way)
    frechet_position, frechet_shape, frechet_colour
                 the distance on one `clip_feature_groups` group alone: where the gap lies"""
    travel = float(displacement(heldout.latents).median())
    feats, ref = clip_features(samples), clip_features(heldout.latents)
    groups = {f"frechet_{name}": frechet_distance(feats[:, cols], ref[:, cols])
              for name, cols in clip_feature_groups(samples.shape[2]).items()}
    accuracy = (decode_factors(samples) == factors).all(dim=1).double().mean()  # exact: 108/120 is 0.9
    temporal = temporal_features(samples, travel), temporal_features(heldout.latents, travel)

    def motion(x: torch.Tensor) -> float:
        return float(motion_coherence(x, travel).float().mean())

    return {"frechet": frechet_distance(feats, ref),
            "temporal": frechet_distance(*temporal, standardise=False),
            "cond_acc": float(accuracy), "motion": motion(samples), "motion_chance": motion(shuffle_frames(samples)),
            "texture": float(texture(samples).mean() / texture(heldout.latents).mean()),
            "frechet_mean": frechet_mean_term(feats, ref),
            "frechet_blur": frechet_distance(clip_features(binomial_blur(samples)),
                                             clip_features(binomial_blur(heldout.latents))),
            **groups}


def clips_to_rgb(latents: torch.Tensor, scale: int = 4) -> torch.Tensor:
    """Visualise clips (N, C, T, H, W) as uint8 frames (N, T, H·scale, W·scale, 3): channels 0..2 -> RGB."""
    rgb = (latents[:, :3].float() / AMPLITUDE).clamp(0, 1)  # (N, 3, T, H, W)
    rgb = rgb.repeat_interleave(scale, dim=3).repeat_interleave(scale, dim=4)
    return (rgb.permute(0, 2, 3, 4, 1) * 255).round().to(torch.uint8)  # (N, T, H', W', 3)


def clip_grid(rows: list[torch.Tensor], scale: int = 4) -> torch.Tensor:
    """Rows of k clips (k, C, T, H, W) each as one uint8 video (T, rows·H', k·W', 3), a row's clips side by side."""
    return torch.cat([torch.cat(list(clips_to_rgb(r, scale)), dim=2) for r in rows], dim=1)


def toy_pixels(latents: torch.Tensor) -> torch.Tensor:
    """The toy's pixels (N, 3, T, H, W) in [-1, 1]: the colour channels as clips_to_rgb shows them, unclamped (what
    the training-health statistics read, components/health.py)."""
    return latents[:, :3] / AMPLITUDE * 2 - 1


# ---------------------------------------------------------------------------------------------------------------------
# The direction variant (the toy's first design; scripts/probe_toy_factors.py --factor direction).


def make_direction_clips(num: int, spec: ToySpec, seed: int) -> ToyClips:
    """Clips whose caption's second word is the direction of motion instead of brightness (every blob bright):
    `factors[:, 1]` is the direction index into DIRECTIONS."""
    clips = make_clips(num, spec, seed)
    g = torch.Generator().manual_seed(seed + 7)
    directions = torch.randint(len(DIRECTIONS), (num,), generator=g)
    bright = clips.factors.clone()
    bright[:, 1] = 1
    words = clips.factors.clone()
    words[:, 1] = directions
    context = encode_captions(bright, spec)  # rows 0 and 2 as the toy's
    table = torch.randn(len(DIRECTIONS), spec.text_dim, generator=torch.Generator().manual_seed(99))
    context[:, 1] = table[directions]  # row 1: the direction word
    return ToyClips(render_clips(bright, directions, spec, g), context, words, directions)


def decode_direction_factors(latents: torch.Tensor) -> torch.Tensor:
    """`decode_factors` with the second factor read as the direction of the blob's first-to-last-frame displacement."""
    out = decode_factors(latents)
    c = blob_statistics(latents)["centroid"]
    out[:, 1] = ((c[:, -1] - c[:, 0]) @ DIRECTIONS.T).argmax(dim=1)
    return out
