"""FastVideo-compatible parquet latents: dataset, writer, and DP×SP step-indexed sharding.

Format (SPEC §4.1–4.2): one row per clip; every tensor is a `(name_bytes, name_shape, name_dtype)` column triple holding
raw little-endian float32 bytes. Files live anywhere under the data root (`**/*.parquet`, sorted by path); the writer uses
`<out>/combined_parquet_dataset/worker_<w>/data_chunk_<n>.parquet`. Two variants:

* latents: `vae_latent_*` (C, T, H, W) un-normalised VAE posterior mean + `text_embedding_*` (L, D) valid rows only;
* text-only (data-free DMD): `id`, `text_embedding_*`, `caption`.

Reading
    ds = LatentDataset("dataA:2,dataB", num_latent_t=20, expect_latent_shape=(16, 20, 56, 104), rank=rank)
    loader = make_loader(ds, batch_size=1, dp_rank=dp_rank, dp_size=dp_size, seed=cfg.seed, start_step=step)
    for batch in loader: ...   # {"latents" (B,C,T,H,W), "context" (B,512,D), "context_mask" (B,512), "caption", "id"}

Sharding: the sample order is a pure function of `(seed, epoch, dp_rank, dp_size)` and the position in it is the global
step, so resuming needs only the step. Ranks of one sequence-parallel group pass the same `dp_rank` and get the same rows.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

TEXT_LEN = 512  # UMT5 context rows after zero-padding (SPEC §3.3b)
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
TEXT_COLUMNS = ["id", "text_embedding_bytes", "text_embedding_shape", "text_embedding_dtype", "caption"]
LATENT_COLUMNS = TEXT_COLUMNS + ["vae_latent_bytes", "vae_latent_shape", "vae_latent_dtype"]


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


# ---------------------------------------------------------------------------------------------------------------------
# Dataset.


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
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error={on_error!r}, expected 'raise' or 'skip'")
        self.text_only = text_only
        self.num_latent_t = num_latent_t
        self.expect_latent_shape = tuple(expect_latent_shape) if expect_latent_shape is not None else None
        self.text_len = text_len
        self.on_error = on_error
        self.columns = TEXT_COLUMNS if text_only else LATENT_COLUMNS
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
        embedding = decode_tensor(table, in_group, "text_embedding", where)
        if embedding.ndim != 2:
            raise DataError(f"{where}: text_embedding_shape={list(embedding.shape)}, expected (L, D)")
        sample["context"], sample["context_mask"] = pad_context(embedding, self.text_len)
        sample["caption"] = table.column("caption")[in_group].as_py() or ""
        sample["id"] = table.column("id")[in_group].as_py() or f"{Path(path).name}:{row}"
        return sample

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


def check_first_row(dataset: LatentDataset, text_dim: int) -> None:
    """Read row 0 now, so latents the dataset rejects (e.g. not its `expect_latent_shape`) or caption embeddings of
    another width than `text_dim` raise DataError before anything expensive is built."""
    width = dataset[0]["context"].shape[-1]  # context (512, D)
    if width != text_dim:
        raise DataError(f"caption embeddings have width {width}, the model expects {text_dim}")


def load_contexts(path: str | Path, count: int) -> torch.Tensor:
    """The padded caption embeddings (N, 512, D) of the first `count` rows of a parquet folder (all rows if fewer)."""
    dataset = LatentDataset(str(path), text_only=True)
    return torch.stack([dataset[i]["context"] for i in range(min(count, len(dataset)))])


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples: {"latents" (B,C,T,H,W), "context" (B,L,D), "context_mask" (B,L), "caption", "id", "num_skipped"}."""
    batch: dict[str, Any] = {}
    for key in ("latents", "context", "context_mask"):
        if key not in samples[0]:
            continue
        shapes = {tuple(s[key].shape) for s in samples}
        if len(shapes) > 1:
            raise DataError(f"cannot batch {key} of different shapes {sorted(shapes)} (ids {[s['id'] for s in samples]})")
        batch[key] = torch.stack([s[key] for s in samples])
    batch["caption"] = [s["caption"] for s in samples]
    batch["id"] = [s["id"] for s in samples]
    batch["num_skipped"] = sum(s["num_skipped"] for s in samples)
    return batch


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


# ---------------------------------------------------------------------------------------------------------------------
# Sharding and loading.


class StepSampler(Sampler[list[int]]):
    """Batches of indices addressed by global step, for one data-parallel rank.

    Epoch e uses `randperm(num_samples)` from `torch.Generator().manual_seed(seed + e)`, truncated to a multiple of
    `dp_size * batch_size`; global step s is batch `s % steps_per_epoch` of epoch `s // steps_per_epoch`, and within it DP
    rank r takes the r-th block of `batch_size` indices. Ranks of one SP group pass the same dp_rank.
    """

    def __init__(self, num_samples: int, batch_size: int, dp_rank: int, dp_size: int, seed: int,
                 start_step: int = 0, num_steps: int | None = None) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} outside [0, dp_size={dp_size})")
        self.steps_per_epoch = num_samples // (dp_size * batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{num_samples} samples < dp_size * batch_size = {dp_size * batch_size}: not one full step")
        self.num_samples, self.batch_size, self.dp_rank, self.dp_size = num_samples, batch_size, dp_rank, dp_size
        self.seed, self.start_step, self.num_steps = seed, start_step, num_steps
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.int64)

    def batches_for(self, step: int) -> list[int]:
        """Indices of this rank's batch at global step `step`."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))
        start = (k * self.dp_size + self.dp_rank) * self.batch_size
        return self._perm[start : start + self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while self.num_steps is None or step < self.start_step + self.num_steps:
            yield self.batches_for(step)
            step += 1

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError("StepSampler without num_steps is endless")
        return self.num_steps


def make_loader(dataset: LatentDataset, batch_size: int, dp_rank: int, dp_size: int, seed: int, start_step: int = 0,
                num_workers: int = 4, num_steps: int | None = None, prefetch_factor: int = 4) -> DataLoader:
    """Endless (or `num_steps`-long) loader of collated batches starting at global step `start_step`."""
    sampler = StepSampler(len(dataset), batch_size, dp_rank, dp_size, seed, start_step, num_steps)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
        timeout=600 if num_workers > 0 else 0,  # a dead or stuck worker raises instead of hanging the step
    )


# ---------------------------------------------------------------------------------------------------------------------
# Writer.


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
