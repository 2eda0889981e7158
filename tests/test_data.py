"""data/ (parquet.py, dataset.py, loader.py, writer.py): published parquet schema round trips, DP×SP step sharding, bad-data handling."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data.dataset import LatentDataset, load_negative_context
from data.loader import StepSampler, make_loader
from data.parquet import INDEX_NAME, DataError, load_index
from data.writer import LatentParquetWriter

# ---------------------------------------------------------------------------------------------------------------------
# An independent writer: plain pyarrow, column by column from FastVideo's published schema
# (fastvideo/dataset/dataloader/schema.py), not data/writer.py or data/parquet.py's schema.


def spec_schema(text_only: bool = False) -> pa.Schema:
    if text_only:
        names = [("id", pa.string()), ("text_embedding_bytes", pa.binary()),
                 ("text_embedding_shape", pa.list_(pa.int64())), ("text_embedding_dtype", pa.string()),
                 ("caption", pa.string())]
        return pa.schema(names)
    return pa.schema([
        ("id", pa.string()), ("vae_latent_bytes", pa.binary()), ("vae_latent_shape", pa.list_(pa.int64())),
        ("vae_latent_dtype", pa.string()), ("text_embedding_bytes", pa.binary()),
        ("text_embedding_shape", pa.list_(pa.int64())), ("text_embedding_dtype", pa.string()),
        ("file_name", pa.string()), ("caption", pa.string()), ("media_type", pa.string()), ("width", pa.int64()),
        ("height", pa.int64()), ("num_frames", pa.int64()), ("duration_sec", pa.float64()), ("fps", pa.float64()),
    ])


def make_clip(rng: np.random.Generator, i: int, latent_shape=(4, 3, 4, 6), text_dim=32) -> dict:
    length = int(rng.integers(1, 20))
    return {
        "id": f"clip_{i:04d}",
        "latents": rng.standard_normal(latent_shape).astype(np.float32),
        "text": rng.standard_normal((length, text_dim)).astype(np.float32),
        "caption": f"caption number {i}",
    }


def spec_row(clip: dict, pixel_hw=(32, 48)) -> dict:
    lat, emb = clip["latents"], clip["text"]
    return {
        "id": clip["id"],
        "vae_latent_bytes": lat.tobytes(), "vae_latent_shape": list(lat.shape), "vae_latent_dtype": "float32",
        "text_embedding_bytes": emb.tobytes(), "text_embedding_shape": list(emb.shape),
        "text_embedding_dtype": "float32",
        "file_name": clip["id"] + ".mp4", "caption": clip["caption"], "media_type": "video",
        # legacy quirk: width column holds shape[-2] (the height), height column holds shape[-1]
        "width": pixel_hw[0], "height": pixel_hw[1],
        "num_frames": lat.shape[1], "duration_sec": 2.5, "fps": 16.0,
    }


def write_spec_dataset(root: Path, clips: list[dict], rows_per_file: int = 8) -> None:
    """`<root>/combined_parquet_dataset/worker_0/data_chunk_<n>.parquet`, zstd, one row group per file."""
    folder = root / "combined_parquet_dataset" / "worker_0"
    folder.mkdir(parents=True, exist_ok=True)
    for n, start in enumerate(range(0, len(clips), rows_per_file)):
        rows = [spec_row(c) for c in clips[start : start + rows_per_file]]
        table = pa.Table.from_pylist(rows, schema=spec_schema())
        pq.write_table(table, folder / f"data_chunk_{n}.parquet", compression="zstd")


def write_table(path: Path, rows: list[dict], schema: pa.Schema) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


@pytest.fixture
def clips() -> list[dict]:
    rng = np.random.default_rng(0)
    return [make_clip(rng, i) for i in range(19)]


# ---------------------------------------------------------------------------------------------------------------------
# Acceptance 1: format compatibility.


def test_independent_writer_reads_back_bit_exact(tmp_path, clips):
    write_spec_dataset(tmp_path, clips)
    ds = LatentDataset(str(tmp_path))
    assert len(ds) == len(clips)
    for i, clip in enumerate(clips):  # files sorted by path; rows in file order
        item = ds[i]
        assert item["id"] == clip["id"] and item["caption"] == clip["caption"]
        assert torch.equal(item["latents"], torch.from_numpy(clip["latents"]))
        n = clip["text"].shape[0]
        assert item["context"].shape == (512, 32)  # text dim taken from the stored shape
        assert torch.equal(item["context"][:n], torch.from_numpy(clip["text"]))
        assert not item["context"][n:].any()
        assert item["context_mask"].tolist() == [1] * n + [0] * (512 - n)
    sliced = LatentDataset(str(tmp_path), num_latent_t=2, expect_latent_shape=(4, 2, 4, 6))
    assert torch.equal(sliced[5]["latents"], torch.from_numpy(clips[5]["latents"][:, :2]))


def test_full_width_text_embedding(tmp_path):
    rng = np.random.default_rng(1)
    clip = make_clip(rng, 0, text_dim=4096)
    write_spec_dataset(tmp_path, [clip])
    item = LatentDataset(str(tmp_path))[0]
    assert item["context"].shape == (512, 4096)
    assert torch.equal(item["context"][: clip["text"].shape[0]], torch.from_numpy(clip["text"]))


def test_our_writer_is_read_by_plain_pyarrow(tmp_path, clips):
    writer = LatentParquetWriter(tmp_path, rows_per_file=8, worker=3)
    flushed = []
    for c in clips:
        flushed += writer.write(c["id"], c["caption"], c["text"], c["latents"], height=32, width=48, fps=24.0,
                                duration_sec=1.5)
    assert flushed == [c["id"] for c in clips[:16]]  # only full files so far
    assert writer.close() == [c["id"] for c in clips[16:]]
    folder = tmp_path / "combined_parquet_dataset" / "worker_3"
    assert sorted(p.name for p in folder.iterdir()) == [f"data_chunk_{n}.parquet" for n in range(3)]  # no temp files
    rows = []
    for n, expected_rows in enumerate([8, 8, 3]):
        path = folder / f"data_chunk_{n}.parquet"
        assert pq.read_schema(path).remove_metadata().equals(spec_schema())
        assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "ZSTD"
        table = pq.read_table(path)
        assert table.num_rows == expected_rows
        rows += table.to_pylist()
    for row, clip in zip(rows, clips):
        assert row["id"] == clip["id"] and row["caption"] == clip["caption"] and row["media_type"] == "video"
        lat = np.frombuffer(row["vae_latent_bytes"], np.float32).reshape(row["vae_latent_shape"])
        assert np.array_equal(lat, clip["latents"]) and row["vae_latent_dtype"] == "float32"
        emb = np.frombuffer(row["text_embedding_bytes"], np.float32).reshape(row["text_embedding_shape"])
        assert np.array_equal(emb, clip["text"])
        assert (row["width"], row["height"], row["num_frames"]) == (32, 48, 3)  # swapped like the legacy writer
    # a resumed writer continues numbering instead of overwriting
    again = LatentParquetWriter(tmp_path, rows_per_file=8, worker=3)
    again.write("late", "x", clips[0]["text"], clips[0]["latents"])
    again.close()
    assert (folder / "data_chunk_3.parquet").is_file()


def test_text_only_writer_and_dataset(tmp_path, clips):
    writer = LatentParquetWriter(tmp_path, rows_per_file=4, text_only=True)
    for c in clips[:6]:
        writer.write(c["id"], c["caption"], c["text"])
    writer.close()
    files = sorted(tmp_path.rglob("*.parquet"))
    assert [pq.read_metadata(f).num_rows for f in files] == [4, 2]
    assert pq.read_schema(files[0]).remove_metadata().equals(spec_schema(text_only=True))
    with pytest.raises(DataError, match="missing columns"):
        LatentDataset(str(tmp_path))  # latents requested from a text-only set
    ds = LatentDataset(str(tmp_path), text_only=True)
    batch = next(iter(make_loader(ds, batch_size=3, dp_rank=0, dp_size=1, seed=0, num_workers=0)))
    assert "latents" not in batch and batch["context"].shape == (3, 512, 32) and batch["context_mask"].shape == (3, 512)
    for k, clip_id in enumerate(batch["id"]):
        clip = next(c for c in clips if c["id"] == clip_id)
        assert torch.equal(batch["context"][k, : len(clip["text"])], torch.from_numpy(clip["text"]))


def test_negative_context_from_safetensors_and_parquet(tmp_path, clips):
    from safetensors.torch import save_file

    emb = clips[0]["text"]
    save_file({"text_embedding": torch.from_numpy(emb)}, str(tmp_path / "neg.safetensors"))
    ctx, mask = load_negative_context(tmp_path / "neg.safetensors")
    assert ctx.shape == (512, 32) and int(mask.sum()) == len(emb)
    assert torch.equal(ctx[: len(emb)], torch.from_numpy(emb)) and not ctx[len(emb) :].any()
    write_table(tmp_path / "neg.parquet", [{"id": c["id"], "text_embedding_bytes": c["text"].tobytes(),
                                            "text_embedding_shape": list(c["text"].shape),
                                            "text_embedding_dtype": "float32", "caption": ""} for c in clips[:3]],
                spec_schema(text_only=True))
    ctx2, _ = load_negative_context(tmp_path / "neg.parquet", row_id=clips[2]["id"])
    assert torch.equal(ctx2[: len(clips[2]["text"])], torch.from_numpy(clips[2]["text"]))
    with pytest.raises(DataError, match="no row with id"):
        load_negative_context(tmp_path / "neg.parquet", row_id="missing")


def test_repeat_weights_and_index_cache(tmp_path, clips):
    a, b = tmp_path / "a", tmp_path / "b"
    write_spec_dataset(a, clips[:5])
    write_spec_dataset(b, clips[5:12])
    ds = LatentDataset(f"{a}:2,{b}")
    assert len(ds) == 2 * 5 + 7
    assert [ds[i]["id"] for i in range(len(ds))] == [c["id"] for c in clips[:5] * 2 + clips[5:12]]
    assert (a / INDEX_NAME).is_file() and (b / INDEX_NAME).is_file()
    # a non-builder rank only reads the cache; a stale cache makes it wait, then time out with a clear error
    assert load_index(a, rank=1, timeout_s=1) == load_index(a, rank=0)
    write_spec_dataset(tmp_path / "a" / "more", clips[12:14])
    with pytest.raises(TimeoutError, match="rank 0 builds it"):
        load_index(a, rank=1, timeout_s=0.3, poll_s=0.1)
    # ... and picks the index up as soon as rank 0 writes it
    result = {}
    waiter = threading.Thread(target=lambda: result.update(files=load_index(a, rank=1, timeout_s=20, poll_s=0.05)))
    waiter.start()
    built = load_index(a, rank=0)
    waiter.join()
    assert result["files"] == built and sum(f["rows"] for f in built) == 7


# ---------------------------------------------------------------------------------------------------------------------
# Acceptance 2: DP 2 × SP 2 sharding and resume.


def test_dp2_sp2_sharding_is_disjoint_covering_and_sp_identical():
    world, sp_size, batch, n = 4, 2, 3, 47
    dp_size = world // sp_size
    samplers = [StepSampler(n, batch, dp_rank=rank // sp_size, dp_size=dp_size, seed=7) for rank in range(world)]
    steps = samplers[0].steps_per_epoch
    assert steps == n // (dp_size * batch)
    epochs = []
    for epoch in range(2):
        per_rank = [[i for s in range(epoch * steps, (epoch + 1) * steps) for i in sm.batches_for(s)] for sm in samplers]
        assert per_rank[0] == per_rank[1] and per_rank[2] == per_rank[3]  # SP peers read the same rows
        assert not set(per_rank[0]) & set(per_rank[2])  # DP ranks disjoint
        covered = per_rank[0] + per_rank[2]
        assert len(covered) == len(set(covered)) == steps * dp_size * batch  # drop_last to a multiple of dp·B
        assert set(covered) <= set(range(n))
        epochs.append(covered)
    assert epochs[0] != epochs[1]  # reshuffled with seed + epoch
    # a pure function of (seed, epoch, dp_rank, dp_size): a fresh sampler asked out of order agrees
    fresh = StepSampler(n, batch, dp_rank=1, dp_size=dp_size, seed=7)
    assert [fresh.batches_for(s) for s in (9, 2, 11)] == [samplers[2].batches_for(s) for s in (9, 2, 11)]
    assert StepSampler(n, batch, 1, dp_size, seed=8).batches_for(0) != samplers[2].batches_for(0)


def test_loader_resume_matches_uninterrupted(tmp_path, clips):
    write_spec_dataset(tmp_path, clips)
    ds = LatentDataset(str(tmp_path))
    world, sp_size, k, total = 4, 2, 5, 9  # 19 rows, dp 2, batch 2 -> 4 steps per epoch: crosses two epochs
    for rank in range(world):
        dp_rank = rank // sp_size
        full = list(make_loader(ds, 2, dp_rank, 2, seed=3, start_step=0, num_workers=2, num_steps=total))
        resumed = list(make_loader(ds, 2, dp_rank, 2, seed=3, start_step=k, num_workers=2, num_steps=total - k))
        assert [b["id"] for b in resumed] == [b["id"] for b in full[k:]]
        for x, y in zip(resumed, full[k:]):
            assert torch.equal(x["latents"], y["latents"]) and torch.equal(x["context"], y["context"])
        assert full[0]["latents"].shape == (2, 4, 3, 4, 6) and full[0]["context"].shape == (2, 512, 32)
        ids = [i for b in full[:4] for i in b["id"]]
        by_id = {c["id"]: c for c in clips}
        assert torch.equal(full[0]["latents"][1], torch.from_numpy(by_id[full[0]["id"][1]]["latents"]))
        if rank == 0:
            first_epoch_dp0 = set(ids)
        if rank == 2:
            assert not first_epoch_dp0 & set(ids)


# ---------------------------------------------------------------------------------------------------------------------
# Acceptance 3: bad data.


def chunk_path(root: Path, n: int = 0) -> Path:
    return root / "combined_parquet_dataset" / "worker_0" / f"data_chunk_{n}.parquet"


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_file_is_named(tmp_path, clips, damage):
    write_spec_dataset(tmp_path, clips)  # chunks 0, 1, 2
    bad = chunk_path(tmp_path, 1)
    data = bad.read_bytes()
    bad.write_bytes(b"not a parquet file" * 10 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"{bad}.*all rows"):
        LatentDataset(str(tmp_path))
    ds = LatentDataset(str(tmp_path), on_error="skip")
    assert ds.bad_files == [str(bad)] and len(ds) == len(clips) - 8


def test_missing_column_is_named(tmp_path, clips):
    write_spec_dataset(tmp_path, clips[:8])
    rows = [spec_row(c) for c in clips[8:10]]
    schema = spec_schema()
    schema = schema.remove(schema.get_field_index("vae_latent_shape"))
    for r in rows:
        del r["vae_latent_shape"]
    bad = chunk_path(tmp_path, 1)
    write_table(bad, rows, schema)
    with pytest.raises(DataError, match=rf"{bad}.*missing columns \['vae_latent_shape'\]"):
        LatentDataset(str(tmp_path))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("vae_latent_shape", [4, 3, 4, 7], r"vae_latent_bytes has 1152 bytes, expected prod\(\[4, 3, 4, 7\]\) \* 4 = 1344"),
        ("vae_latent_dtype", "int8", r"vae_latent_dtype='int8', expected one of"),
        ("text_embedding_dtype", "float16", r"text_embedding_bytes has \d+ bytes"),  # float16-sized bytes claim
        ("text_embedding_shape", [7], r"text_embedding_shape=\[7\], expected \(L, D\)"),
    ],
)
def test_bad_row_is_named_or_skipped(tmp_path, clips, field, value, message):
    rows = [spec_row(c) for c in clips[:8]]
    rows[5][field] = value
    if field == "text_embedding_dtype":  # stored as real float16: half the bytes the shape needs as float32
        rows[5]["text_embedding_bytes"] = clips[5]["text"].astype(np.float16).tobytes()
    if field == "text_embedding_shape":
        rows[5]["text_embedding_bytes"] = clips[5]["text"][:1, :7].tobytes()
    path = chunk_path(tmp_path)
    write_table(path, rows, spec_schema())
    ds = LatentDataset(str(tmp_path))
    for i in (0, 4, 6):
        ds[i]
    with pytest.raises(DataError, match=rf"{path} row 5: {message}"):
        ds[5]
    # skip-and-count: row 5 is replaced by row 6, deterministically
    skip = LatentDataset(str(tmp_path), on_error="skip")
    item = skip[5]
    assert item["id"] == clips[6]["id"] and item["num_skipped"] == 1 and skip.num_skipped == 1
    batches = list(make_loader(skip, 4, 0, 1, seed=0, num_workers=2, num_steps=2))
    assert sum(b["num_skipped"] for b in batches) == 1 and all(len(b["id"]) == 4 for b in batches)


def test_unexpected_latent_shape_is_named(tmp_path, clips):
    write_spec_dataset(tmp_path, clips[:8])
    ds = LatentDataset(str(tmp_path), expect_latent_shape=(16, 3, 4, 6))
    with pytest.raises(DataError, match=rf"{chunk_path(tmp_path)} row 2: latent shape \(4, 3, 4, 6\) != expected"):
        ds[2]
    with pytest.raises(DataError, match=r"row 0: 3 latent frames < num_latent_t=5"):
        LatentDataset(str(tmp_path), num_latent_t=5)[0]


@pytest.mark.timeout(120)  # the loader's own timeout is 600 s: a hang must fail here first
def test_worker_error_propagates_without_hang(tmp_path, clips):
    rows = [spec_row(c) for c in clips[:4]]
    rows[2]["vae_latent_dtype"] = "uint8"
    write_table(chunk_path(tmp_path), rows, spec_schema())
    loader = make_loader(LatentDataset(str(tmp_path)), 4, 0, 1, seed=0, num_workers=1, num_steps=1)
    with pytest.raises(DataError, match="row 2: vae_latent_dtype='uint8'"):
        next(iter(loader))


def test_all_bad_rows_raise_in_skip_mode(tmp_path, clips):
    rows = [spec_row(c) for c in clips[:3]]
    for r in rows:
        r["vae_latent_dtype"] = "int32"
    write_table(chunk_path(tmp_path), rows, spec_schema())
    with pytest.raises(DataError, match="3 consecutive bad rows"):
        LatentDataset(str(tmp_path), on_error="skip")[0]
