"""Writing clips in FastVideo's parquet latents format (`data/parquet.py`), one durable file at a time."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from data.parquet import I2V_SCHEMA, I2V_TENSORS, LATENT_SCHEMA, TEXT_ONLY_SCHEMA


class LatentParquetWriter:
    """Writes rows in the published schema to `<out>/combined_parquet_dataset/worker_<w>/data_chunk_<n>.parquet`.

    Exactly `rows_per_file` rows per file, zstd, one row group per row (random access reads one row); each file is written
    to a temp name and renamed, so readers never see a partial file. `write()` and `close()` return the ids made durable
    by that call. Numbering continues after existing chunks, so a resumed run never overwrites.
    """

    def __init__(self, out_dir: str | Path, rows_per_file: int = 8, worker: int = 0, text_only: bool = False,
                 i2v: bool = False) -> None:
        """i2v: the I2V schema (`write` then takes first_frame_latent, and clip_feature for Wan2.1-I2V)."""
        if text_only and i2v:
            raise ValueError("text_only and i2v exclude each other: I2V rows carry latents")
        self.dir = Path(out_dir) / "combined_parquet_dataset" / f"worker_{worker}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rows_per_file = rows_per_file
        self.schema = TEXT_ONLY_SCHEMA if text_only else I2V_SCHEMA if i2v else LATENT_SCHEMA
        self.text_only, self.i2v = text_only, i2v
        existing = [int(p.stem.removeprefix("data_chunk_")) for p in self.dir.glob("data_chunk_*.parquet")]
        self.next_chunk = max(existing, default=-1) + 1
        self.rows: list[dict[str, Any]] = []

    def write(self, id: str, caption: str, text_embedding: torch.Tensor | np.ndarray,
              latents: torch.Tensor | np.ndarray | None = None, *, height: int = 0, width: int = 0,
              fps: float = 0.0, duration_sec: float = 0.0, file_name: str | None = None,
              first_frame_latent: torch.Tensor | np.ndarray | None = None,
              clip_feature: torch.Tensor | np.ndarray | None = None) -> list[str]:
        """Queue one clip: text_embedding (L, D) valid rows; latents (C, T, H, W) un-normalised; height/width in pixels.
        I2V writers: first_frame_latent (C, T, H, W) un-normalised, the latents' shape; clip_feature (L_img, D_img) or
        None (no image encoder)."""
        emb = np.ascontiguousarray(np.asarray(torch.as_tensor(text_embedding).detach().cpu().float()))
        if emb.ndim != 2:
            raise ValueError(f"{id}: text_embedding must be (L, D), got shape {emb.shape}")
        row: dict[str, Any] = {
            "id": id,
            "text_embedding_bytes": emb.astype("<f4").tobytes(),
            "text_embedding_shape": list(emb.shape),
            "text_embedding_dtype": "float32",
            "caption": caption,
        }
        if not self.text_only:
            if latents is None:
                raise ValueError(f"{id}: latents are required (writer is not text_only)")
            lat = np.ascontiguousarray(np.asarray(torch.as_tensor(latents).detach().cpu().float()))
            if lat.ndim != 4:
                raise ValueError(f"{id}: latents must be (C, T, H, W), got shape {lat.shape}")
            row.update(
                vae_latent_bytes=lat.astype("<f4").tobytes(), vae_latent_shape=list(lat.shape),
                vae_latent_dtype="float32", file_name=file_name or id, media_type="video",
                # The legacy writer puts the frame height in `width` and the width in `height`; we keep that quirk.
                width=height, height=width,
                num_frames=lat.shape[1], duration_sec=float(duration_sec), fps=float(fps),
            )
        if self.i2v:
            row.update(i2v_columns(id, lat.shape, first_frame_latent, clip_feature))
        elif first_frame_latent is not None or clip_feature is not None:
            raise ValueError(f"{id}: first_frame_latent / clip_feature need an I2V writer (i2v=True)")
        self.rows.append(row)
        return self.flush() if len(self.rows) >= self.rows_per_file else []

    def flush(self) -> list[str]:
        """Write queued rows (normally one full file) to the next chunk; returns their ids."""
        if not self.rows:
            return []
        table = pa.Table.from_pylist(self.rows, schema=self.schema)
        final = self.dir / f"data_chunk_{self.next_chunk}.parquet"
        tmp = final.with_suffix(".parquet.tmp")
        pq.write_table(table, tmp, compression="zstd", row_group_size=1)
        os.replace(tmp, final)
        self.next_chunk += 1
        ids = [r["id"] for r in self.rows]
        self.rows = []
        return ids

    def close(self) -> list[str]:
        """Final flush: writes the remainder (< rows_per_file rows) if any."""
        return self.flush()


def i2v_columns(id: str, latent_shape: tuple[int, ...], first_frame_latent: torch.Tensor | np.ndarray | None,
                clip_feature: torch.Tensor | np.ndarray | None) -> dict[str, Any]:
    """The I2V schema's tensor columns of one row: float32 triples, the absent ones as (b"", [], "")."""
    if first_frame_latent is None:
        raise ValueError(f"{id}: an I2V row needs first_frame_latent (C, T, H, W)")
    columns: dict[str, Any] = {}
    for name in I2V_TENSORS:
        columns.update({f"{name}_bytes": b"", f"{name}_shape": [], f"{name}_dtype": ""})
    for name, value, ndim in (("first_frame_latent", first_frame_latent, 4), ("clip_feature", clip_feature, 2)):
        if value is None:
            continue
        array = np.ascontiguousarray(np.asarray(torch.as_tensor(value).detach().cpu().float()))
        if array.ndim != ndim:
            raise ValueError(f"{id}: {name} must have {ndim} dims, got shape {array.shape}")
        columns.update({f"{name}_bytes": array.astype("<f4").tobytes(), f"{name}_shape": list(array.shape),
                        f"{name}_dtype": "float32"})
    if tuple(columns["first_frame_latent_shape"]) != tuple(latent_shape):
        raise ValueError(f"{id}: first_frame_latent shape {tuple(columns['first_frame_latent_shape'])} != latents "
                         f"shape {tuple(latent_shape)} (both (C, T, H, W) of the same clip)")
    return columns
