"""Writing clips in FastVideo's parquet latents format (`data/parquet.py`), one durable file at a time."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from data.parquet import LATENT_SCHEMA, TEXT_ONLY_SCHEMA


class LatentParquetWriter:
    """Writes rows in the published schema to `<out>/combined_parquet_dataset/worker_<w>/data_chunk_<n>.parquet`.

    Exactly `rows_per_file` rows per file, zstd, one row group per row (random access reads one row); each file is written
    to a temp name and renamed, so readers never see a partial file. `write()` and `close()` return the ids made durable
    by that call. Numbering continues after existing chunks, so a resumed run never overwrites.
    """

    def __init__(self, out_dir: str | Path, rows_per_file: int = 8, worker: int = 0, text_only: bool = False) -> None:
        self.dir = Path(out_dir) / "combined_parquet_dataset" / f"worker_{worker}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rows_per_file = rows_per_file
        self.schema = TEXT_ONLY_SCHEMA if text_only else LATENT_SCHEMA
        self.text_only = text_only
        existing = [int(p.stem.removeprefix("data_chunk_")) for p in self.dir.glob("data_chunk_*.parquet")]
        self.next_chunk = max(existing, default=-1) + 1
        self.rows: list[dict[str, Any]] = []

    def write(self, id: str, caption: str, text_embedding: torch.Tensor | np.ndarray,
              latents: torch.Tensor | np.ndarray | None = None, *, height: int = 0, width: int = 0,
              fps: float = 0.0, duration_sec: float = 0.0, file_name: str | None = None) -> list[str]:
        """Queue one clip: text_embedding (L, D) valid rows; latents (C, T, H, W) un-normalised; height/width in pixels."""
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
