"""`LatentDataset`: the rows of FastVideo-format parquet folders as tensors, and the few one-off readers recipes use.

    ds = LatentDataset("dataA:2,dataB", num_latent_t=20, expect_latent_shape=(16, 20, 56, 104), rank=rank)
    ds[i]   # {"latents" (C,T,H,W), "context" (512,D), "context_mask" (512,), "caption", "id", "num_skipped"}
    LatentDataset("i2v_data", i2v=True)[i]   # + "first_frame_latent" (C,T,H,W) [+ "clip_feature" (257, 1280)]

The format and the row index: `data/parquet.py`; batches in step order: `data/loader.py`.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from data.parquet import (
    I2V_COLUMNS,
    LATENT_COLUMNS,
    TEXT_COLUMNS,
    TEXT_LEN,
    DataError,
    decode_optional_tensor,
    decode_tensor,
    load_index,
    pad_context,
    parse_data_path,
)


class LatentDataset(Dataset):
    """Rows of `*.parquet` under one or more folders ('dirA:2,dirB' repeats dirA twice).

    Each item: `latents (C, T, H, W)` float32 un-normalised (absent when `text_only`), `context (text_len, D)` zero-padded,
    `context_mask (text_len,)`, `caption`, `id`, `num_skipped` (bad rows passed over to produce this item).

    on_error="raise": the first bad file or row raises `DataError` naming it. on_error="skip": unreadable files and files
    missing columns are dropped at construction (`bad_files`), and a bad row is replaced by the next good row in index
    order (deterministic, so SP peers stay identical), counted in `num_skipped` (this process) and in each item.

    The row index is cached in `<folder>/.sparse_distill_index.json`; when it is missing or stale the process with
    `rank == 0` rebuilds it and the others poll for it (up to `index_timeout_s`). Pass the global rank on shared
    storage, the node-local rank on node-local copies.
    """

    def __init__(
        self,
        data_path: str,
        *,
        text_only: bool = False,
        num_latent_t: int | None = None,
        expect_latent_shape: Sequence[int] | None = None,
        text_len: int = TEXT_LEN,
        on_error: str = "raise",
        rank: int = 0,
        index_timeout_s: float = 600.0,
        i2v: bool = False,
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error={on_error!r}, expected 'raise' or 'skip'")
        if text_only and i2v:
            raise ValueError("text_only and i2v exclude each other: I2V rows carry latents")
        self.text_only, self.i2v = text_only, i2v
        self.num_latent_t = num_latent_t
        self.expect_latent_shape = tuple(expect_latent_shape) if expect_latent_shape is not None else None
        self.text_len = text_len
        self.on_error = on_error
        self.columns = TEXT_COLUMNS if text_only else I2V_COLUMNS if i2v else LATENT_COLUMNS
        self.bad_files: list[str] = []
        self.num_skipped = 0

        # One entry per (file, repeat): path, cumulative row-group starts.
        self.paths: list[str] = []
        group_starts: list[np.ndarray] = []
        rows: list[int] = []
        for root, repeat in parse_data_path(data_path):
            good = []
            for f in load_index(root, rank=rank, timeout_s=index_timeout_s):
                path = str(root / f["path"])
                missing = [c for c in self.columns if c not in f["columns"]]
                problem = f["error"] or (f"missing columns {missing}" if missing else None)
                if problem:
                    if on_error == "raise":
                        raise DataError(f"{path} (all rows): {problem}")
                    self.bad_files.append(path)
                elif f["rows"] > 0:
                    good.append((path, f["row_groups"], f["rows"]))
            for _ in range(repeat):
                for path, groups, n in good:
                    self.paths.append(path)
                    group_starts.append(np.cumsum([0] + groups))
                    rows.append(n)
        self.group_starts = group_starts
        self.file_starts = np.cumsum([0] + rows)
        if len(self) == 0:
            raise DataError(f"no readable rows under {data_path!r} (bad files: {self.bad_files})")
        self._handles: OrderedDict[str, pq.ParquetFile] = OrderedDict()  # per process; built lazily in each worker

    def __len__(self) -> int:
        return int(self.file_starts[-1])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": OrderedDict()}  # open files don't cross process boundaries

    def locate(self, index: int) -> tuple[str, int, int, int]:
        """Global index -> (file path, row in file, row group, row within that group)."""
        f = int(np.searchsorted(self.file_starts, index, side="right")) - 1
        row = index - int(self.file_starts[f])
        g = int(np.searchsorted(self.group_starts[f], row, side="right")) - 1
        return self.paths[f], row, g, row - int(self.group_starts[f][g])

    def read_row_group(self, path: str, group: int) -> pa.Table:
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = pq.ParquetFile(path)
            if len(self._handles) > 64:
                self._handles.popitem(last=False)
        return handle.read_row_group(group, columns=self.columns)

    def read_row(self, index: int) -> dict[str, Any]:
        path, row, group, in_group = self.locate(index)
        where = f"{path} row {row}"
        try:
            table = self.read_row_group(path, group)
        except Exception as e:  # corrupt pages, file changed since indexing
            raise DataError(f"{where}: cannot read row group {group}: {type(e).__name__}: {e}") from e
        sample: dict[str, Any] = {}
        if not self.text_only:
            latents = decode_tensor(table, in_group, "vae_latent", where)
            if latents.ndim != 4:
                raise DataError(f"{where}: vae_latent_shape={list(latents.shape)}, expected (C, T, H, W)")
            if self.num_latent_t is not None:
                if latents.shape[1] < self.num_latent_t:
                    raise DataError(f"{where}: {latents.shape[1]} latent frames < num_latent_t={self.num_latent_t}")
                latents = latents[:, : self.num_latent_t]
            if self.expect_latent_shape is not None and tuple(latents.shape) != self.expect_latent_shape:
                raise DataError(
                    f"{where}: latent shape {tuple(latents.shape)} != expected (C, T, H, W) {self.expect_latent_shape}"
                )
            sample["latents"] = torch.from_numpy(latents.copy())  # copy: arrow buffers are read-only
        if self.i2v:
            sample.update(self.read_i2v(table, in_group, where, tuple(latents.shape)))
        embedding = decode_tensor(table, in_group, "text_embedding", where)
        if embedding.ndim != 2:
            raise DataError(f"{where}: text_embedding_shape={list(embedding.shape)}, expected (L, D)")
        sample["context"], sample["context_mask"] = pad_context(embedding, self.text_len)
        sample["caption"] = table.column("caption")[in_group].as_py() or ""
        sample["id"] = table.column("id")[in_group].as_py() or f"{Path(path).name}:{row}"
        return sample

    def read_i2v(self, table: pa.Table, row: int, where: str, latent_shape: tuple[int, ...]) -> dict[str, Any]:
        """first_frame_latent (C, T, H, W), cut to num_latent_t like the latents (the Wan VAE is causal in time: the
        first T latent frames are those of the shorter clip), and clip_feature (L_img, D_img) where stored."""
        first = decode_optional_tensor(table, row, "first_frame_latent", where)
        if first is None:
            raise DataError(f"{where}: first_frame_latent is empty; an I2V dataset needs it "
                            "(tools/preprocess.py --i2v)")
        if self.num_latent_t is not None:
            first = first[:, : self.num_latent_t]
        if tuple(first.shape) != latent_shape:
            raise DataError(f"{where}: first_frame_latent shape {tuple(first.shape)} != latents {latent_shape}")
        out = {"first_frame_latent": torch.from_numpy(first.copy())}
        clip = decode_optional_tensor(table, row, "clip_feature", where)
        if clip is not None:
            if clip.ndim != 2:
                raise DataError(f"{where}: clip_feature_shape={list(clip.shape)}, expected (L_img, D_img)")
            out["clip_feature"] = torch.from_numpy(clip.copy())
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.on_error == "raise":
            return {**self.read_row(index), "num_skipped": 0}
        first_error = None
        for attempt in range(min(len(self), 256)):
            try:
                return {**self.read_row((index + attempt) % len(self)), "num_skipped": attempt}
            except DataError as e:
                self.num_skipped += 1
                first_error = first_error or e
        raise DataError(f"{min(len(self), 256)} consecutive bad rows from index {index}; first: {first_error}")


def check_first_row(dataset: LatentDataset, text_dim: int, image_dim: int | None = None) -> None:
    """Read row 0 now, so latents the dataset rejects (e.g. not its `expect_latent_shape`) or caption embeddings of
    another width than `text_dim` raise DataError before anything expensive is built; with `image_dim` (a model that
    takes CLIP image tokens, Wan2.1-I2V) the row must also hold a clip_feature that wide."""
    row = dataset[0]
    width = row["context"].shape[-1]  # context (512, D)
    if width != text_dim:
        raise DataError(f"caption embeddings have width {width}, the model expects {text_dim}")
    clip = row.get("clip_feature")  # (L_img, D_img) or None
    if image_dim is not None and (clip is None or clip.shape[-1] != image_dim):
        got = "no clip_feature" if clip is None else f"clip_feature of width {clip.shape[-1]}"
        raise DataError(f"{dataset.locate(0)[0]} (row 0) has {got}; this model takes CLIP tokens of width "
                        f"{image_dim} (Wan2.1-I2V: tools/preprocess.py --i2v with a model folder that has "
                        "image_encoder/)")


def load_contexts(path: str | Path, count: int) -> torch.Tensor:
    """The padded caption embeddings (N, 512, D) of the first `count` rows of a parquet folder (all rows if fewer)."""
    dataset = LatentDataset(str(path), text_only=True)
    return torch.stack([dataset[i]["context"] for i in range(min(count, len(dataset)))])


def load_negative_context(path: str | Path, text_len: int = TEXT_LEN,
                          row_id: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One prompt embedding (e.g. the CFG negative prompt) -> (context (text_len, D), mask (text_len,)).

    `.safetensors`: the tensor `text_embedding` (L, D) (as written by tools/preprocess.py --negative-prompt).
    `.parquet`: the text-embedding triple of row `row_id` (default: the first row).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if "text_embedding" not in tensors:
            raise DataError(f"{path}: no tensor 'text_embedding' (found {sorted(tensors)})")
        return pad_context(tensors["text_embedding"].float(), text_len)
    try:
        table = pq.read_table(path, columns=["id", "text_embedding_bytes", "text_embedding_shape", "text_embedding_dtype"])
    except Exception as e:
        raise DataError(f"{path}: cannot read text embedding columns: {type(e).__name__}: {e}") from e
    ids = table.column("id").to_pylist()
    if row_id is not None and row_id not in ids:
        raise DataError(f"{path}: no row with id {row_id!r}")
    row = ids.index(row_id) if row_id is not None else 0
    return pad_context(decode_tensor(table, row, "text_embedding", f"{path} row {row}"), text_len)
