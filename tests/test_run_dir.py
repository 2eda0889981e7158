"""components/run_dir.py and the random initial weights of preset runs (models/wan_weights.export_random_init).

write_run_files: config.toml holds the given TOML, the recipe copy is byte-identical, env.txt names git/torch/command.
save_samples: a stand-in VAE (non-trivial latent mean/std) whose decode is a known function of the raw latents; every
prompt gets an mp4 and a TensorBoard frame strip whose pixels equal a decode done by hand. export_random_init: the same
seed gives the same weights as a seeded WanModel, an existing folder is kept, and the global RNG is untouched.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from components.metrics import MetricsLogger, read_video_info
from components.run_dir import save_samples, write_run_files
from models.wan import WAN_CONFIGS, WanModel
from models.wan_weights import export_random_init, load_pretrained

ROOT = Path(__file__).resolve().parents[1]


def test_write_run_files(tmp_path):
    recipe = ROOT / "recipes" / "wan21_1_3b_sparse_distill.py"
    write_run_files(tmp_path / "run", "[run]\nname = \"x\"\n", recipe)
    assert (tmp_path / "run" / "config.toml").read_text() == "[run]\nname = \"x\"\n"
    assert (tmp_path / "run" / recipe.name).read_bytes() == recipe.read_bytes()
    env = dict(line.split(": ", 1) for line in (tmp_path / "run" / "env.txt").read_text().splitlines())
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert env["git"] == sha and env["torch"] == torch.__version__ and env["world_size"] == "1"
    assert {"cuda", "gpus", "command"} <= set(env)


class StandInVAE(torch.nn.Module):
    """decode(z) = tanh(mean over channels of z), repeated to 3 colours and 2 frames per latent frame; per-channel
    latent statistics far from (0, 1) and different per channel, so a de-normalisation that skips, swaps or
    transposes mean and std decodes to visibly different frames."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # vae_decode reads the device and dtype from a parameter
        self.config = SimpleNamespace(latents_mean=mean, latents_std=std)

    def decode(self, z: torch.Tensor) -> SimpleNamespace:
        video = z.mean(1, keepdim=True).tanh().repeat_interleave(2, dim=2).expand(-1, 3, -1, -1, -1)  # (N, 3, 2T, H, W)
        return SimpleNamespace(sample=video)


def test_save_samples_decodes_denormalised_latents_to_mp4s_and_strips(tmp_path):
    mean, std = [0.6, -0.4, 0.1, -0.9], [0.2, 0.5, 1.3, 0.3]
    latents = torch.randn(3, 4, 2, 16, 24, generator=torch.Generator().manual_seed(0))  # (N, C, T, H, W) normalised
    metrics = MetricsLogger(tmp_path / "run")
    save_samples(StandInVAE(mean, std), latents, tmp_path / "run" / "samples" / "step-000007", metrics, step=7, fps=4)
    metrics.close()
    mp4s = sorted((tmp_path / "run" / "samples" / "step-000007").glob("*.mp4"))
    assert [p.name for p in mp4s] == ["prompt00.mp4", "prompt01.mp4", "prompt02.mp4"]
    assert all(read_video_info(p) == (4, 16, 24) for p in mp4s)  # 2 latent frames -> 4 frames, H×W kept

    # The decode done by hand: raw latents z = latents·std_c + mean_c, the stand-in's frames, then uint8 pixels.
    z = latents * torch.tensor(std).view(4, 1, 1, 1) + torch.tensor(mean).view(4, 1, 1, 1)
    gray = z.mean(1).tanh().repeat_interleave(2, dim=1)  # (N, 4, H, W) in [-1, 1]
    expected = ((gray + 1) * 127.5).round().clamp(0, 255)  # (N, F, H, W)
    for i, path in enumerate(mp4s):  # H.264 (yuv420p) is lossy: compare the mean error, a few levels at most
        frames = torch.from_numpy(read_frames(path)).float()  # (F, H, W, 3)
        err = (frames.mean(-1) - expected[i]).abs().mean().item()
        assert err < 4, f"{path.name}: mean |pixel error| {err:.1f} levels"  # measured 0.4-0.5
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    assert {"val/prompt00", "val/prompt01", "val/prompt02"} <= set(events.Tags()["images"])
    strip = events.Images("val/prompt01")[0]
    assert strip.step == 7
    # The TensorBoard strip is lossless (PNG): the frames side by side, exactly the hand decode.
    import io

    from PIL import Image

    pixels = torch.from_numpy(np.asarray(Image.open(io.BytesIO(strip.encoded_image_string)).convert("RGB"))).float()
    assert torch.equal(pixels[..., 0], torch.cat(list(expected[1]), dim=1))  # (H, F·W)


def read_frames(path: Path) -> np.ndarray:
    import imageio

    reader = imageio.get_reader(path, format="FFMPEG")
    try:
        return np.stack([frame for frame in reader])  # (F, H, W, 3)
    finally:
        reader.close()


def test_export_random_init_is_seeded_written_once_and_keeps_the_global_rng(tmp_path):
    cfg = WAN_CONFIGS["tiny"]
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    out = export_random_init(cfg, tmp_path / "random_init", seed=5)
    assert torch.equal(torch.get_rng_state(), rng)
    torch.manual_seed(5)
    expected = WanModel(cfg).state_dict()
    loaded = load_pretrained(out).state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    stamp = (out / "config.json").stat().st_mtime_ns
    assert export_random_init(cfg, out, seed=6) == out and (out / "config.json").stat().st_mtime_ns == stamp
