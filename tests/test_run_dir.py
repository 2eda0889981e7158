"""components/run_dir.py and the random initial weights of preset runs (models/wan_weights.export_random_init).

write_run_files: config.toml holds the given TOML, the recipe copy is byte-identical, env.txt names git/torch/command.
save_samples: a stand-in VAE whose decode is a known function of the latents; every prompt gets an mp4 with the decoded
frames and a TensorBoard frame strip. export_random_init: the same seed gives the same weights as a seeded WanModel,
an existing folder is kept, and the global RNG is untouched.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

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
    """decode(z) = tanh(mean over channels of z), repeated to 3 colours and 2 frames per latent frame."""

    def __init__(self, channels: int):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # vae_decode reads the device and dtype from a parameter
        self.config = SimpleNamespace(latents_mean=[0.0] * channels, latents_std=[1.0] * channels)

    def decode(self, z: torch.Tensor) -> SimpleNamespace:
        video = z.mean(1, keepdim=True).tanh().repeat_interleave(2, dim=2).expand(-1, 3, -1, -1, -1)  # (N, 3, 2T, H, W)
        return SimpleNamespace(sample=video)


def test_save_samples_writes_one_mp4_and_strip_per_prompt(tmp_path):
    latents = torch.randn(3, 4, 2, 16, 24)  # (N, C, T, H, W)
    metrics = MetricsLogger(tmp_path / "run")
    save_samples(StandInVAE(4), latents, tmp_path / "run" / "samples" / "step-000007", metrics, step=7, fps=4)
    metrics.close()
    mp4s = sorted((tmp_path / "run" / "samples" / "step-000007").glob("*.mp4"))
    assert [p.name for p in mp4s] == ["prompt00.mp4", "prompt01.mp4", "prompt02.mp4"]
    assert all(read_video_info(p) == (4, 16, 24) for p in mp4s)  # 2 latent frames -> 4 frames, H×W kept
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    assert {"val/prompt00", "val/prompt01", "val/prompt02"} <= set(events.Tags()["images"])
    assert events.Images("val/prompt01")[0].step == 7


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
