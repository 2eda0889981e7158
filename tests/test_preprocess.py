"""tools/preprocess.py end to end on CPU with a tiny VAE + tiny UMT5; tools/download_hf.py's call; data/encode.py;
data/video.py. The tools run as scripts (in-process through runpy where a start-up would cost seconds)."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from data.dataset import LatentDataset, load_negative_context
from data.encode import (
    denormalize_latents,
    encode_prompts,
    latent_stats,
    load_text_encoder,
    load_vae,
    normalize_latents,
    vae_decode,
    vae_encode,
)
from data.loader import make_loader
from data.video import read_clip
from tests.tiny_pipeline import TINY_TEXT_DIM, TINY_Z_DIM, build_tiny_pipeline

REPO = Path(__file__).resolve().parents[1]
PREPROCESS = REPO / "tools" / "preprocess.py"
DOWNLOAD = REPO / "tools" / "download_hf.py"

SRC_FPS, H, W = 24, 32, 48
CLIPS = {  # id: (caption, frames, pixel size)
    "alpha": ("a red cat walks on the street", 20, (H, W)),
    "bravo": ("a blue bird flies in the sky", 18, (H, W)),
    "charlie": ("a small dog sits at night", 22, (40, 64)),  # resized + center-cropped
    "short": ("a car drives fast", 10, (H, W)),  # too short for 9 frames at 12 fps
}


def clip_frames(seed: int, n: int, size: tuple[int, int]) -> np.ndarray:
    """Smooth frames (codecs keep them nearly intact): per-frame gray level plus a horizontal ramp."""
    rng = np.random.default_rng(seed)
    levels = rng.integers(30, 220, size=n)
    ramp = np.linspace(-20, 20, size[1])[None, :, None]
    frames = levels[:, None, None, None] + ramp[None]  # (F, 1, W, 1)
    return np.broadcast_to(frames, (n, size[0], size[1], 3)).clip(0, 255).astype(np.uint8).copy()


def write_mp4(path: Path, frames: np.ndarray, fps: int) -> None:
    import imageio.v2 as imageio

    with imageio.get_writer(path, "ffmpeg", fps=fps, codec="libx264", quality=10, macro_block_size=8,
                            ffmpeg_log_level="error") as w:
        for f in frames:
            w.append_data(f)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("preprocess")
    pipe = build_tiny_pipeline(root / "pipe")
    videos = root / "videos"
    videos.mkdir()
    frames = {}
    for seed, (clip_id, (_, n, size)) in enumerate(CLIPS.items()):
        frames[clip_id] = clip_frames(seed, n, size)
        write_mp4(videos / f"{clip_id}.mp4", frames[clip_id], SRC_FPS)
    captions = root / "captions.txt"
    captions.write_text("".join(f"{k}.mp4\t{v[0]}\n" for k, v in CLIPS.items()))
    return {"root": root, "pipe": pipe, "videos": videos, "captions": captions, "frames": frames}


def run_tool(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(PREPROCESS), *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def run_in_process(script: Path, argv: list[str]) -> None:
    """`python script argv...` in this process (no start-up; a monkeypatched library is seen by the script)."""
    saved = sys.argv
    sys.argv = [str(script), *argv]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = saved


def video_args(ws: dict, out: Path, captions: Path) -> list[str]:
    return ["--model", str(ws["pipe"]), "--videos", str(ws["videos"]), "--captions", str(captions), "--out", str(out),
            "--height", str(H), "--width", str(W), "--num-frames", "9", "--fps", "12", "--batch-size", "2",
            "--rows-per-file", "2", "--device", "cpu"]


def test_preprocess_end_to_end_and_resume(workspace, capsys):
    ws, out = workspace, workspace["root"] / "latents"
    # an interrupted run (in-process, to save a start-up): only the first two clips
    first = ws["root"] / "first.json"
    first.write_text(json.dumps([{"path": "alpha.mp4", "cap": CLIPS["alpha"][0]},
                                 {"path": "bravo.mp4", "cap": [CLIPS["bravo"][0]]}]))
    run_in_process(PREPROCESS, video_args(ws, out, first))
    assert (out / "done_ids.txt").read_text().split() == ["alpha", "bravo"]
    # the full list: alpha and bravo are skipped, 'short' is skipped as too short
    proc = run_tool(*video_args(ws, out, ws["captions"]), "--negative-prompt", "blurry low quality")
    assert "2 already written" in proc.stdout and "skip" in proc.stdout and "short" in proc.stdout
    files = sorted(out.rglob("*.parquet"))
    assert [f.name for f in files] == ["data_chunk_0.parquet", "data_chunk_1.parquet"]
    ids = [i for f in files for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()]
    assert ids == ["alpha", "bravo", "charlie"]  # each clip exactly once
    # a third run writes nothing
    stamps = [f.stat().st_mtime_ns for f in files]
    capsys.readouterr()
    run_in_process(PREPROCESS, video_args(ws, out, ws["captions"]))
    assert "3 already written" in capsys.readouterr().out
    assert sorted(out.rglob("*.parquet")) == files and [f.stat().st_mtime_ns for f in files] == stamps

    ds = LatentDataset(str(out), expect_latent_shape=(TINY_Z_DIM, 3, H // 8, W // 8))
    items = {ds[i]["id"]: ds[i] for i in range(len(ds))}
    vae = load_vae(ws["pipe"])
    for clip_id in ("alpha", "bravo"):  # source already at target size: frames 0, 2, ..., 16 in [-1, 1]
        raw = torch.from_numpy(ws["frames"][clip_id][::2][:9]).float()  # (F, H, W, 3), pre-codec pixels
        decoded = read_all_frames(ws["videos"] / f"{clip_id}.mp4")[::2][:9]
        assert np.abs(decoded.astype(float) - raw.numpy()).max() <= 8  # the codec is nearly lossless here
        video = torch.from_numpy(decoded).float().permute(3, 0, 1, 2)[None] / 127.5 - 1  # (1, 3, F, H, W)
        expected = vae.encode(video).latent_dist.mean[0]
        torch.testing.assert_close(items[clip_id]["latents"], expected, atol=1e-5, rtol=1e-5)
        # preprocess encoded the captions two at a time (padded); the reference encodes each alone, unpadded
        expected, n = umt5_context(ws["pipe"], CLIPS[clip_id][0], items[clip_id]["context"].shape)
        assert items[clip_id]["caption"] == CLIPS[clip_id][0] and int(items[clip_id]["context_mask"].sum()) == n
        torch.testing.assert_close(items[clip_id]["context"], expected, atol=1e-5, rtol=1e-5)
    expected, n = umt5_context(ws["pipe"], CLIPS["charlie"][0], items["charlie"]["context"].shape)  # 6 words, not 7
    assert int(items["charlie"]["context_mask"].sum()) == n
    torch.testing.assert_close(items["charlie"]["context"], expected, atol=1e-5, rtol=1e-5)
    row = pq.read_table(files[1]).to_pylist()[0]
    assert (row["id"], row["file_name"], row["num_frames"], row["fps"]) == ("charlie", "charlie.mp4", 3, SRC_FPS)
    assert (row["width"], row["height"]) == (H, W)  # legacy swap
    neg, neg_mask = load_negative_context(out / "negative_prompt.safetensors")
    expected, n = umt5_context(ws["pipe"], "blurry low quality", neg.shape)
    assert int(neg_mask.sum()) == n
    torch.testing.assert_close(neg, expected, atol=1e-5, rtol=1e-5)

    # the result feeds the tiny model: normalised batch -> forward + backward
    from attention.sdpa import sdpa_attention
    from models.wan import WAN_CONFIGS, WanModel

    cfg = WAN_CONFIGS["tiny"]
    assert (cfg.in_channels, cfg.text_dim) == (TINY_Z_DIM, TINY_TEXT_DIM)
    batch = next(iter(make_loader(ds, batch_size=2, dp_rank=0, dp_size=1, seed=0, num_workers=0, num_steps=1)))
    mean, std = latent_stats(vae)
    x0 = normalize_latents(batch["latents"], mean, std)
    model = WanModel(cfg, attn_fn=sdpa_attention)
    v = model(x0, torch.tensor([500.0, 250.0]), batch["context"])
    assert v.shape == x0.shape
    v.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def read_all_frames(path: Path) -> np.ndarray:
    import imageio.v2 as imageio

    with imageio.get_reader(path, "ffmpeg") as r:
        return np.stack([f for f in r])


def umt5_context(pipe: Path, prompt: str, shape: torch.Size) -> tuple[torch.Tensor, int]:
    """A stored caption embedding computed independently of data/encode.py: transformers' tokenizer and UMT5 encoder
    on this prompt alone (no padding, no attention mask), its n hidden states as the first rows of a zero context of
    `shape`. n = words + 1: the tiny tokenizer is word-level and appends </s>, as T5's does."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(pipe / "tokenizer")
    encoder = UMT5EncoderModel.from_pretrained(pipe / "text_encoder").eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids  # (1, n)
    n = len(prompt.split()) + 1
    assert ids.shape == (1, n) and ids[0, -1] == tokenizer.eos_token_id
    with torch.no_grad():
        hidden = encoder(input_ids=ids).last_hidden_state[0]  # (n, D)
    context = torch.zeros(shape)
    context[:n] = hidden
    return context, n


def test_encode_prompts_batch_equals_each_prompt_alone(workspace):
    """Prompts of different lengths in one padded batch: each keeps exactly its own unpadded encoding."""
    prompts = ["a cat", "the small dog runs in the rain at night", "blue sky"]
    tokenizer, encoder = load_text_encoder(workspace["pipe"])
    context, mask, lengths = encode_prompts(tokenizer, encoder, prompts)
    for i, prompt in enumerate(prompts):
        expected, n = umt5_context(workspace["pipe"], prompt, context[i].shape)
        assert int(lengths[i]) == n and mask[i].tolist() == [1] * n + [0] * (mask.shape[1] - n)
        torch.testing.assert_close(context[i], expected, atol=1e-5, rtol=1e-5)


def test_read_clip_subsamples_resizes_and_crops(workspace):
    src = workspace["frames"]["charlie"]  # 22 frames of 40x64, smooth
    video, fps, duration = read_clip(workspace["videos"] / "charlie.mp4", 32, 32, 9, 12.0)
    assert video.shape == (3, 9, 32, 32) and fps == SRC_FPS and duration > 0
    # 40x64 -> scale 0.8 -> 32x52 (ceil 51.2) -> center crop 32 columns; frame i comes from source frame 2 i
    levels = torch.from_numpy(src[::2][:9, 0, 26:38, 0].astype(np.float32)).mean(1) / 127.5 - 1  # centre columns
    assert torch.allclose(video[0, :, 16, 14:18].mean(1), levels, atol=0.06)
    assert video.min() >= -1 and video.max() <= 1
    assert read_clip(workspace["videos"] / "short.mp4", 32, 48, 9, 12.0) is None


def test_prompts_only(workspace, capsys):
    ws, out = workspace, workspace["root"] / "prompts"
    prompts = ws["root"] / "prompts.txt"
    prompts.write_text("a cat\n\nthe dog runs in the rain\na green tree\n")
    run_tool("--model", str(ws["pipe"]), "--prompts-only", str(prompts), "--out", str(out), "--rows-per-file", "2",
             "--batch-size", "2", "--device", "cpu")
    ds = LatentDataset(str(out), text_only=True)
    assert [ds[i]["id"] for i in range(3)] == ["prompt_000000", "prompt_000001", "prompt_000002"]
    assert ds[1]["caption"] == "the dog runs in the rain"
    expected, _ = umt5_context(ws["pipe"], "the dog runs in the rain", ds[1]["context"].shape)
    torch.testing.assert_close(ds[1]["context"], expected, atol=1e-5, rtol=1e-5)
    capsys.readouterr()
    run_in_process(PREPROCESS, ["--model", str(ws["pipe"]), "--prompts-only", str(prompts), "--out", str(out)])
    assert "3 already written" in capsys.readouterr().out and len(list(out.rglob("*.parquet"))) == 2


@pytest.mark.parametrize(
    "z_dim, spatial, override, message",
    [
        (16, 8, ["--num-frames", "8"], "≡ 1 mod 4"),
        (16, 8, ["--height", "40"], "--height 40 must be a positive multiple of 16"),
        (48, 16, ["--width", "48"], "--width 48 must be a positive multiple of 32"),
    ],
)
def test_validation_before_models_load(tmp_path, z_dim, spatial, override, message):
    (tmp_path / "vae").mkdir()  # only a config: models are never loaded
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"z_dim": z_dim, "scale_factor_spatial": spatial}))
    args = {"--height": "64", "--width": "64", "--num-frames": "9"}
    args.update(dict(zip(override[::2], override[1::2])))
    argv = ["--model", str(tmp_path), "--captions", "x.txt", "--out", str(tmp_path / "o"), "--fps", "16"]
    argv += [x for kv in args.items() for x in kv]
    with pytest.raises(SystemExit, match=message):
        run_in_process(PREPROCESS, argv)


def test_encode_helpers_round_trip(workspace):
    vae = load_vae(workspace["pipe"])
    mean, std = latent_stats(vae)
    assert mean.shape == std.shape == (TINY_Z_DIM,) and not torch.equal(std, torch.ones(TINY_Z_DIM))
    z = torch.randn(2, TINY_Z_DIM, 2, 3, 4)
    zn = normalize_latents(z, mean, std)
    torch.testing.assert_close(zn[:, 1], (z[:, 1] - mean[1]) / std[1])
    torch.testing.assert_close(denormalize_latents(zn, mean, std), z)
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    torch.testing.assert_close(vae_encode(vae, video), vae.encode(video).latent_dist.mean)
    out = vae_decode(vae, normalize_latents(vae_encode(vae, video), mean, std))
    torch.testing.assert_close(out, vae.decode(vae.encode(video).latent_dist.mean).sample.clamp(-1, 1))


def test_download_hf_call(monkeypatch, tmp_path, capsys):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kw: calls.append(kw) or kw["local_dir"])
    run_in_process(DOWNLOAD, ["--repo", "FastVideo/Wan-Syn_77x448x832_600k", "--repo-type", "dataset", "--local-dir",
                              str(tmp_path / "d"), "--allow-patterns", "*.parquet", "--allow-patterns", "*.json"])
    assert calls == [{"repo_id": "FastVideo/Wan-Syn_77x448x832_600k", "repo_type": "dataset",
                      "local_dir": str(tmp_path / "d"), "allow_patterns": ["*.parquet", "*.json"], "revision": None}]
    run_in_process(DOWNLOAD, ["--repo", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "--local-dir", str(tmp_path / "m")])
    assert calls[-1]["repo_type"] == "model" and calls[-1]["allow_patterns"] is None
    run_in_process(DOWNLOAD, ["--examples"])
    printed = capsys.readouterr().out
    for repo in ("Wan-AI/Wan2.1-T2V-14B-Diffusers", "FastVideo/FastWan2.2-TI2V-5B-FullAttn-Diffusers",
                 "FastVideo/Wan-Syn_77x448x832_600k"):
        assert repo in printed
    assert len(calls) == 2


def test_preprocessed_data_trains_in_the_tiny_recipe(workspace, tmp_path):
    """Issue 5, acceptance 5: tools/preprocess.py output (latents, negative prompt, text-only validation prompts) is the
    data of a real recipe run: the 1.3B recipe with the tiny overlay, 2 steps (a critic and a student update)."""
    ws = workspace
    out, prompts_out = tmp_path / "latents", tmp_path / "prompts"
    run_in_process(PREPROCESS, [*video_args(ws, out, ws["captions"]), "--negative-prompt", "blurry low quality"])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na red kite over the sea\n")
    run_in_process(PREPROCESS, ["--model", str(ws["pipe"]), "--prompts-only", str(prompts), "--out", str(prompts_out),
                     "--device", "cpu"])
    overrides = [f"model.base={ws['pipe']}", f"data.path={out}", f"data.negative_prompt={out / 'negative_prompt.safetensors'}",
                 f"data.val_prompts={prompts_out}", "video.num_frames=9", f"video.height={H}", f"video.width={W}",
                 f"run.out_dir={tmp_path / 'runs'}", "run.name=preprocessed", "run.max_steps=2", "run.val_count=1"]
    recipe = REPO / "recipes" / "wan21_1_3b_sparse_distill.py"
    proc = subprocess.run([sys.executable, str(recipe), "--toml", str(REPO / "tests/assets/tiny.toml"), *overrides],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / recipe.stem / "preprocessed"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss/critic" in r]  # the training steps' rows (validation and health log their own)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["loss/critic"]) for r in rows) and np.isfinite(rows[1]["loss/dmd"])
    assert (run_dir / "export" / "transformer" / "config.json").is_file()
