"""I2V parquet rows (FastVideo's `pyarrow_schema_i2v`): data/writer.py -> data/dataset.py bit-exact, read by plain
pyarrow by column name, and tools/preprocess.py --i2v on a tiny pipeline folder against diffusers' VAE and
transformers' CLIP called directly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from data.dataset import LatentDataset
from data.parquet import DataError
from data.writer import LatentParquetWriter

# FastVideo's I2V columns (fastvideo/dataset/dataloader/schema.py), written out here.
REFERENCE_I2V_COLUMNS = [
    "id", "vae_latent_bytes", "vae_latent_shape", "vae_latent_dtype", "text_embedding_bytes", "text_embedding_shape",
    "text_embedding_dtype", "clip_feature_bytes", "clip_feature_shape", "clip_feature_dtype",
    "first_frame_latent_bytes", "first_frame_latent_shape", "first_frame_latent_dtype", "pil_image_bytes",
    "pil_image_shape", "pil_image_dtype", "file_name", "caption", "media_type", "width", "height", "num_frames",
    "duration_sec", "fps",
]


def rows(clip: bool, n: int = 5, shape=(4, 3, 4, 6)):
    rng = np.random.default_rng(1)
    for i in range(n):
        yield {
            "id": f"clip{i}", "caption": f"caption {i}",
            "text_embedding": rng.standard_normal((int(rng.integers(1, 9)), 32)).astype(np.float32),
            "latents": rng.standard_normal(shape).astype(np.float32),
            "first_frame_latent": rng.standard_normal(shape).astype(np.float32),
            "clip_feature": rng.standard_normal((17, 16)).astype(np.float32) if clip else None,
        }


@pytest.mark.parametrize("clip", [True, False])
def test_i2v_rows_round_trip_bit_exact(tmp_path, clip):
    written = list(rows(clip))
    writer = LatentParquetWriter(tmp_path, rows_per_file=2, i2v=True)
    for r in written:
        writer.write(r["id"], r["caption"], r["text_embedding"], r["latents"], height=32, width=48,
                     first_frame_latent=r["first_frame_latent"], clip_feature=r["clip_feature"])
    writer.close()
    files = sorted(tmp_path.rglob("*.parquet"))
    assert len(files) == 3
    assert pq.read_schema(files[0]).names == REFERENCE_I2V_COLUMNS
    # Plain pyarrow by column name: the bytes are the float32 arrays, the absent CLIP column is (b"", [], "").
    table = pq.read_table(files[0])
    first = np.frombuffer(table.column("first_frame_latent_bytes")[0].as_py(), "<f4")
    assert np.array_equal(first.reshape(table.column("first_frame_latent_shape")[0].as_py()),
                          written[0]["first_frame_latent"])
    if not clip:
        assert table.column("clip_feature_bytes")[0].as_py() == b""
        assert table.column("clip_feature_shape")[0].as_py() == []

    dataset = LatentDataset(str(tmp_path), i2v=True)
    assert len(dataset) == len(written)
    for i, r in enumerate(written):
        item = dataset[i]
        assert torch.equal(item["latents"], torch.from_numpy(r["latents"]))
        assert torch.equal(item["first_frame_latent"], torch.from_numpy(r["first_frame_latent"]))
        if clip:
            assert torch.equal(item["clip_feature"], torch.from_numpy(r["clip_feature"]))
        else:
            assert "clip_feature" not in item
    # The T2V reader reads the same files (it ignores the I2V columns); an I2V reader of T2V files names the column.
    assert torch.equal(LatentDataset(str(tmp_path))[0]["latents"], torch.from_numpy(written[0]["latents"]))
    cut = LatentDataset(str(tmp_path), i2v=True, num_latent_t=2)[1]
    assert torch.equal(cut["first_frame_latent"], torch.from_numpy(written[1]["first_frame_latent"][:, :2]))


def test_i2v_writer_and_reader_errors(tmp_path):
    r = next(rows(True))
    writer = LatentParquetWriter(tmp_path / "a", i2v=True)
    with pytest.raises(ValueError, match="clip0: an I2V row needs first_frame_latent"):
        writer.write(r["id"], r["caption"], r["text_embedding"], r["latents"])
    with pytest.raises(ValueError, match=r"first_frame_latent shape \(4, 2, 4, 6\) != latents shape \(4, 3, 4, 6\)"):
        writer.write(r["id"], r["caption"], r["text_embedding"], r["latents"],
                     first_frame_latent=r["first_frame_latent"][:, :2])
    with pytest.raises(ValueError, match="need an I2V writer"):
        LatentParquetWriter(tmp_path / "b").write(r["id"], r["caption"], r["text_embedding"], r["latents"],
                                                  first_frame_latent=r["first_frame_latent"])
    t2v = LatentParquetWriter(tmp_path / "t2v")
    t2v.write(r["id"], r["caption"], r["text_embedding"], r["latents"])
    t2v.close()
    with pytest.raises(DataError, match="missing columns .*first_frame_latent_bytes"):
        LatentDataset(str(tmp_path / "t2v"), i2v=True)


def test_preprocess_i2v_writes_the_condition_and_clip_tokens(tmp_path):
    """tools/preprocess.py --i2v on a tiny Wan2.1-I2V-layout folder: first_frame_latent equals diffusers' VAE posterior
    mean of [frame 0, black frames] and clip_feature CLIP's hidden_states[-2] of frame 0, both computed here."""
    import imageio.v2 as imageio
    from diffusers import AutoencoderKLWan
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from tests.tiny_pipeline import build_tiny_pipeline
    from tools.preprocess import main as preprocess

    model = build_tiny_pipeline(tmp_path / "pipe")
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8)
    CLIPVisionModel(vision).eval().save_pretrained(model / "image_encoder")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32).save_pretrained(model / "image_processor")
    videos = tmp_path / "videos"
    videos.mkdir()
    frames = np.random.default_rng(0).integers(0, 256, size=(9, 32, 48, 3), dtype=np.uint8)
    with imageio.get_writer(videos / "a.mp4", "ffmpeg", fps=16, codec="libx264", quality=10, macro_block_size=8,
                            ffmpeg_log_level="error") as w:
        for frame in frames:
            w.append_data(frame)
    (tmp_path / "captions.json").write_text(json.dumps([{"path": "a.mp4", "cap": "a red car"}]))
    out = tmp_path / "data"
    preprocess(["--model", str(model), "--videos", str(videos), "--captions", str(tmp_path / "captions.json"),
                "--out", str(out), "--height", "32", "--width", "48", "--num-frames", "5", "--fps", "16",
                "--device", "cpu", "--i2v"])
    item = LatentDataset(str(out), i2v=True)[0]

    from data.video import read_clip  # the same decoded pixels the tool encoded

    pixels, _, _ = read_clip(videos / "a.mp4", 32, 48, 5, 16)  # (3, F, H, W) in [-1, 1]
    vae = AutoencoderKLWan.from_pretrained(model / "vae").eval()
    condition = torch.cat([pixels[None, :, :1], torch.zeros(1, 3, 4, 32, 48)], dim=2)
    with torch.no_grad():
        expected = vae.encode(condition).latent_dist.mean[0]
    assert item["first_frame_latent"].shape == item["latents"].shape == (4, 2, 4, 6)
    torch.testing.assert_close(item["first_frame_latent"], expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(item["first_frame_latent"], item["latents"])  # not the video's own latents

    frame0 = Image.fromarray(((pixels[:, 0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy())
    clip = CLIPVisionModel.from_pretrained(model / "image_encoder").eval()
    inputs = CLIPImageProcessor.from_pretrained(model / "image_processor")(images=frame0, return_tensors="pt")
    with torch.no_grad():
        tokens = clip(**inputs, output_hidden_states=True).hidden_states[-2][0]
    torch.testing.assert_close(item["clip_feature"], tokens, atol=1e-6, rtol=1e-5)
    assert Path(out / "done_ids.txt").read_text().split() == ["a"]
