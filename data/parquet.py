"""FastVideo's parquet latents format: the schemas, the cached row index of a data folder, and decoding one row.

Format (FastVideo's `fastvideo/dataset/dataloader/schema.py`, `pyarrow_schema_t2v`): one row per clip; every tensor is a
`(name_bytes, name_shape, name_dtype)` column triple holding raw little-endian float32 bytes. Files live anywhere under
the data root (`**/*.parquet`, sorted by path). Two variants:

* latents: `vae_latent_*` (C, T, H, W) un-normalised VAE posterior mean + `text_embedding_*` (L, D) valid rows only;
* text-only (data-free DMD): `id`, `text_embedding_*`, `caption`;
* I2V (`pyarrow_schema_i2v`): the latents columns plus `first_frame_latent_*` (C, T, H, W), the un-normalised VAE
  posterior mean of [first frame, black frames...] the I2V models are conditioned on (the 4-channel first-frame mask
  is not stored: it follows from the shape), `clip_feature_*` (257, 1280) CLIP penultimate hidden states for
  Wan2.1-I2V (empty bytes and shape [] for Wan2.2-I2V-A14B, which has no image encoder), and `pil_image_*` (the
  reference's validation image; written empty here).

Reading rows: `data/dataset.py`; batching and DP×SP sharding: `data/loader.py`; writing: `data/writer.py`.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

TEXT_LEN = 512  # UMT5 context rows after zero-padding (Wan's text length)
INDEX_NAME = ".sparse_distill_index.json"
INDEX_VERSION = 2  # 2: column lists stored once under "schemas"; a version-1 cache is rebuilt
FLOAT_DTYPES = {"float32", "float16", "bfloat16", "float64"}  # accepted in *_dtype (bytes are read as float32 anyway)

LATENT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("vae_latent_bytes", pa.binary()),
        ("vae_latent_shape", pa.list_(pa.int64())),
        ("vae_latent_dtype", pa.string()),
        ("text_embedding_bytes", pa.binary()),
        ("text_embedding_shape", pa.list_(pa.int64())),
        ("text_embedding_dtype", pa.string()),
        ("file_name", pa.string()),
        ("caption", pa.string()),
        ("media_type", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("num_frames", pa.int64()),
        ("duration_sec", pa.float64()),
        ("fps", pa.float64()),
    ]
)
TEXT_ONLY_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text_embedding_bytes", pa.binary()),
        ("text_embedding_shape", pa.list_(pa.int64())),
        ("text_embedding_dtype", pa.string()),
        ("caption", pa.string()),
    ]
)
I2V_TENSORS = ("clip_feature", "first_frame_latent", "pil_image")
I2V_SCHEMA = pa.schema(
    list(LATENT_SCHEMA)[:7]  # id, vae_latent_*, text_embedding_*
    + [pa.field(f"{name}_{part}", kind) for name in I2V_TENSORS
       for part, kind in (("bytes", pa.binary()), ("shape", pa.list_(pa.int64())), ("dtype", pa.string()))]
    + list(LATENT_SCHEMA)[7:]  # file_name ... fps
)
TEXT_COLUMNS = ["id", "text_embedding_bytes", "text_embedding_shape", "text_embedding_dtype", "caption"]
LATENT_COLUMNS = TEXT_COLUMNS + ["vae_latent_bytes", "vae_latent_shape", "vae_latent_dtype"]
I2V_COLUMNS = LATENT_COLUMNS + [f"{name}_{part}" for name in ("first_frame_latent", "clip_feature")
                                for part in ("bytes", "shape", "dtype")]


class DataError(ValueError):
    """A parquet file or row that does not follow the published schema; the message names the file and row."""


# ---------------------------------------------------------------------------------------------------------------------
# Row index: (files, row counts, row groups, columns), cached next to the data.


def parse_data_path(data_path: str) -> list[tuple[Path, int]]:
    """'dirA:2,dirB' -> [(dirA, 2), (dirB, 1)]: folders with repeat counts."""
    folders = []
    for item in data_path.split(","):
        item = item.strip()
        if not item:
            continue
        head, sep, tail = item.rpartition(":")
        path, repeat = (head, int(tail)) if sep and tail.isdigit() else (item, 1)
        if repeat < 1:
            raise ValueError(f"data path {item!r}: repeat count must be >= 1")
        if not Path(path).is_dir():
            raise FileNotFoundError(f"data path {path!r} (from {data_path!r}) is not a directory")
        folders.append((Path(path), repeat))
    if not folders:
        raise ValueError(f"data path {data_path!r} names no folder")
    return folders


def list_parquet(root: Path) -> list[dict[str, Any]]:
    """All `*.parquet` under root, sorted, with the (size, mtime) that key the index cache."""
    files = []
    for path in sorted(root.rglob("*.parquet")):
        st = path.stat()
        files.append({"path": str(path.relative_to(root)), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return files


def describe_parquet(path: Path) -> dict[str, Any]:
    """Row count, row-group sizes and column names from the footer, or the reason the footer is unreadable."""
    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as e:  # ArrowInvalid, OSError: truncated or not parquet at all
        return {"rows": 0, "row_groups": [], "columns": [], "error": f"{type(e).__name__}: {e}"}
    groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    return {"rows": meta.num_rows, "row_groups": groups, "columns": list(meta.schema.to_arrow_schema().names), "error": None}


def load_index(root: Path, rank: int = 0, timeout_s: float = 600.0, poll_s: float = 0.5) -> list[dict[str, Any]]:
    """The cached row index of root; rank 0 (re)builds it when stale, other ranks poll until it matches their listing."""
    cache = root / INDEX_NAME
    listing = list_parquet(root)
    key = [(f["path"], f["size"], f["mtime_ns"]) for f in listing]

    def read_cached() -> list[dict[str, Any]] | None:
        try:
            cached = json.loads(cache.read_text())
        except (OSError, ValueError):
            return None
        if cached.get("version") != INDEX_VERSION:
            return None
        if [(f["path"], f["size"], f["mtime_ns"]) for f in cached["files"]] != key:
            return None
        return [{**f, "columns": cached["schemas"][f["columns"]]} for f in cached["files"]]

    files = read_cached()
    if files is not None:
        return files
    if rank == 0:
        files = [{**f, **describe_parquet(root / f["path"])} for f in listing]
        schemas: dict[tuple[str, ...], int] = {}  # column lists stored once: 75k files share one schema
        stored = [{**f, "columns": schemas.setdefault(tuple(f["columns"]), len(schemas))} for f in files]
        tmp = cache.with_name(f"{INDEX_NAME}.tmp.{os.getpid()}")
        try:
            tmp.write_text(json.dumps({"version": INDEX_VERSION, "schemas": list(schemas), "files": stored}))
            os.replace(tmp, cache)
        except OSError as e:
            raise OSError(f"cannot write the row index {cache} ({e}); the data folder must be writable by rank 0") from e
        return files
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(poll_s)
        files = read_cached()
        if files is not None:
            return files
    raise TimeoutError(
        f"rank {rank}: row index {cache} for {len(listing)} parquet files did not appear within {timeout_s:.0f}s; "
        "rank 0 builds it — check that rank 0 constructs the dataset on the same data path"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Decoding one row.


def decode_tensor(table: pa.Table, row: int, name: str, where: str) -> np.ndarray:
    """The float32 array of column triple `name` at `row`, validated against its shape and dtype columns."""
    raw = table.column(f"{name}_bytes")[row]
    shape = table.column(f"{name}_shape")[row].as_py()
    dtype = table.column(f"{name}_dtype")[row].as_py()
    if not raw.is_valid or shape is None:
        raise DataError(f"{where}: {name}_bytes / {name}_shape is null")
    if not shape or any(not isinstance(s, int) or s <= 0 for s in shape):
        raise DataError(f"{where}: {name}_shape={shape} is not a list of positive ints")
    if str(dtype).removeprefix("torch.") not in FLOAT_DTYPES:
        raise DataError(f"{where}: {name}_dtype={dtype!r}, expected one of {sorted(FLOAT_DTYPES)}")
    buf = raw.as_buffer()
    if buf.size != math.prod(shape) * 4:
        raise DataError(
            f"{where}: {name}_bytes has {buf.size} bytes, expected prod({shape}) * 4 = {math.prod(shape) * 4} "
            "(bytes are float32)"
        )
    return np.frombuffer(buf, dtype="<f4").reshape(shape)


def decode_optional_tensor(table: pa.Table, row: int, name: str, where: str) -> np.ndarray | None:
    """`decode_tensor`, or None for the schema's "absent" value: empty bytes with shape [] (or nulls)."""
    raw = table.column(f"{name}_bytes")[row]
    shape = table.column(f"{name}_shape")[row].as_py()
    if (not raw.is_valid or raw.as_buffer().size == 0) and not shape:
        return None
    return decode_tensor(table, row, name, where)


def pad_context(embedding: np.ndarray | torch.Tensor, text_len: int = TEXT_LEN) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, D) valid rows -> context (text_len, D) zero-padded (or cropped) and mask (text_len,) int64."""
    emb = torch.from_numpy(np.array(embedding, np.float32)) if isinstance(embedding, np.ndarray) else embedding.float()
    if emb.ndim != 2:
        raise ValueError(f"text embedding must be (L, D), got shape {tuple(emb.shape)}")
    n = min(emb.shape[0], text_len)
    context = torch.zeros(text_len, emb.shape[1], dtype=torch.float32)
    context[:n] = emb[:n]
    mask = torch.zeros(text_len, dtype=torch.int64)
    mask[:n] = 1
    return context, mask
