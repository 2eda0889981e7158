"""A toy text-to-video latent dataset with known factors, and the analyser that scores samples against it.

Each clip is one Gaussian blob moving in a straight line through a latent video `(C, T, H, W)`. Three factors come
from the caption: colour (which of channels 0..2 the blob lights up; channel 3 is a shared "luminance"), direction of
motion (right, left, down, up) and size (small / large blob). Start position and brightness are random per clip, so a
caption has a whole distribution of videos (what makes few-step sampling of the teacher blurry).

A caption is a text-like embedding `(L_txt, D_txt)`: one fixed random "word" vector per factor value in rows 0..2,
zero padding after; the unconditional ("negative") caption is all zeros. Everything is generated from seeds.

Evaluation (`evaluate_samples`): Fréchet distance between hand-designed features of generated and held-out clips
(per-frame blob centroid, spread, peak, mass, per-channel mass, velocity), standardised by the held-out statistics, and
conditioning accuracy (colour, direction and size decoded by `decode_factors` all equal to the caption's).
"""

from dataclasses import dataclass

import torch

COLOUR_NAMES = ("red", "green", "blue")
DIRECTION_NAMES = ("right", "left", "down", "up")
SIZE_NAMES = ("small", "large")
DIRECTIONS = torch.tensor([[0.0, 1.0], [0.0, -1.0], [1.0, 0.0], [-1.0, 0.0]])  # (dy, dx) per direction
BLOB_SIGMA = (2.0, 3.5)  # latent pixels, per size
AMPLITUDE = 6.0  # mean blob height in the colour channel (luminance: 0.75 of it); clips have std ~0.6
BACKGROUND_LEVEL = 0.6  # the analyser's noise floor (blob peaks are >= 3.6 in luminance)
SIZE_SPLIT = 2.9  # radial RMS above the floor: ~2.1 for small, ~3.7 for large blobs; split between them


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
    factors: torch.Tensor  # (N, 3) int64: colour, direction, size


def num_captions() -> int:
    return len(COLOUR_NAMES) * len(DIRECTION_NAMES) * len(SIZE_NAMES)


def all_factors() -> torch.Tensor:
    """Every caption's factors, (24, 3) int64, in a fixed order."""
    grids = torch.meshgrid(torch.arange(3), torch.arange(4), torch.arange(2), indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], dim=1)


def caption_name(factors: torch.Tensor) -> str:
    colour, direction, size = (int(f) for f in factors)
    return f"a {SIZE_NAMES[size]} {COLOUR_NAMES[colour]} blob moving {DIRECTION_NAMES[direction]}"


def encode_captions(factors: torch.Tensor, spec: ToySpec, vocab_seed: int = 0) -> torch.Tensor:
    """Caption embeddings (N, L_txt, D_txt) for factors (N, 3): word vectors (fixed by vocab_seed) in rows 0..2."""
    if spec.text_len < 3:
        raise ValueError(f"ToySpec.text_len must be >= 3 (one row per factor), got {spec.text_len}")
    g = torch.Generator().manual_seed(vocab_seed)
    words = [torch.randn(n, spec.text_dim, generator=g) for n in (3, 4, 2)]  # one table per factor
    context = torch.zeros(factors.shape[0], spec.text_len, spec.text_dim)
    for row, table in enumerate(words):
        context[:, row] = table[factors[:, row]]
    return context


def negative_context(spec: ToySpec, batch: int = 1) -> torch.Tensor:
    """The unconditional caption: all zeros, (batch, L_txt, D_txt)."""
    return torch.zeros(batch, spec.text_len, spec.text_dim)


def render_clips(factors: torch.Tensor, spec: ToySpec, generator: torch.Generator) -> torch.Tensor:
    """Latent clips (N, C, T, H, W) for the given factors with random start positions and brightness."""
    if spec.channels < 4:
        raise ValueError(f"ToySpec.channels must be >= 4 (3 colour + luminance), got {spec.channels}")
    n, T = factors.shape[0], spec.frames
    sigma = torch.tensor(BLOB_SIGMA)[factors[:, 2]]  # (N,)
    step = DIRECTIONS[factors[:, 1]] * spec.travel  # (N, 2) displacement over the clip
    # the path is centred in the frame, then shifted by a random offset of at most ±jitter pixels per axis
    centre_start = torch.tensor([(spec.height - 1) / 2, (spec.width - 1) / 2]) - step / 2  # (N, 2)
    start = centre_start + spec.jitter * (2 * torch.rand(n, 2, generator=generator) - 1)
    amplitude = AMPLITUDE * (0.8 + 0.4 * torch.rand(n, generator=generator))
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
    """`num` clips cycling through all 24 captions (balanced), shuffled, fully determined by `seed`."""
    g = torch.Generator().manual_seed(seed)
    factors = all_factors().repeat(num // num_captions() + 1, 1)[:num]
    factors = factors[torch.randperm(num, generator=g)]
    return ToyClips(render_clips(factors, spec, g), encode_captions(factors, spec), factors)


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
    """Deterministic read-out of (colour, direction, size) from clips (N, C, T, H, W) -> (N, 3) int64."""
    s = blob_statistics(latents)
    colour = s["channel_mass"].argmax(dim=1)
    motion = s["centroid"][:, -1] - s["centroid"][:, 0]  # (N, 2)
    direction = (motion @ DIRECTIONS.T).argmax(dim=1)
    size = (s["spread"].mean(dim=1) > SIZE_SPLIT).long()
    return torch.stack([colour, direction, size], dim=1)


def clip_features(latents: torch.Tensor) -> torch.Tensor:
    """Feature vectors (N, 5T + 5) for the Fréchet distance."""
    s = blob_statistics(latents)
    velocity = s["centroid"][:, -1] - s["centroid"][:, 0]
    parts = [s["centroid"].flatten(1), s["spread"], s["peak"], s["mass"], s["channel_mass"], velocity]
    return torch.cat(parts, dim=1)


def frechet_distance(features: torch.Tensor, reference: torch.Tensor) -> float:
    """Fréchet distance between Gaussian fits of two feature sets, after standardising both with the reference's
    mean and std (so every feature counts in units of its spread in real data)."""
    mu_ref, std_ref = reference.double().mean(0), reference.double().std(0) + 1e-6
    a = (features.double() - mu_ref) / std_ref
    b = (reference.double() - mu_ref) / std_ref
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    # tr sqrt(A B) = tr sqrt(B^½ A B^½), symmetric PSD -> eigenvalues
    eval_b, evec_b = torch.linalg.eigh(cov_b)
    sqrt_b = evec_b @ torch.diag(eval_b.clamp(min=0).sqrt()) @ evec_b.T
    cross = torch.linalg.eigvalsh(sqrt_b @ cov_a @ sqrt_b).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross)


def evaluate_samples(samples: torch.Tensor, factors: torch.Tensor, heldout: ToyClips) -> dict[str, float]:
    """Distance of generated clips to held-out data and the fraction whose decoded factors all match the caption."""
    accuracy = (decode_factors(samples) == factors).all(dim=1).float().mean()
    return {"frechet": frechet_distance(clip_features(samples), clip_features(heldout.latents)),
            "cond_acc": float(accuracy)}


def clips_to_rgb(latents: torch.Tensor, scale: int = 4) -> torch.Tensor:
    """Visualise clips (N, C, T, H, W) as uint8 frames (N, T, H·scale, W·scale, 3): channels 0..2 -> RGB."""
    rgb = (latents[:, :3].float() / AMPLITUDE).clamp(0, 1)  # (N, 3, T, H, W)
    rgb = rgb.repeat_interleave(scale, dim=3).repeat_interleave(scale, dim=4)
    return (rgb.permute(0, 2, 3, 4, 1) * 255).round().to(torch.uint8)  # (N, T, H', W', 3)
