"""Loader throughput on Wan-Syn-sized rows vs what one GPU consumes.

    python benchmarks/bench_data.py                       # 48 rows, 4 workers, both row-group layouts
    python benchmarks/bench_data.py --rows 96 --workers 8 --dir /fast/disk/tmp
    python benchmarks/bench_data.py --smoke          # small rows, no workers: the whole path in seconds

Writes a synthetic dataset shaped like `FastVideo/Wan-Syn_77x448x832_600k` (latents 16×20×56×104 float32 ≈ 7.5 MB/row,
text embedding ~100×4096 float32 ≈ 1.6 MB/row) in two layouts — ours (one row group per row) and the published one (one
row group per 8-row file, so reading one row reads eight) — then times `make_loader` (batch 1, one DP rank) after a
warm-up. One H100 doing 1.3B Sparse-distill at this size consumes about one row per ~3 s (0.33 rows/s); the margin is
loader rows/s divided by that. Files are fresh in the page cache, so this measures decode + transfer, not cold disk.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from data.dataset import LatentDataset
from data.loader import make_loader
from data.parquet import LATENT_SCHEMA
from data.writer import LatentParquetWriter

LATENT_SHAPE = (16, 20, 56, 104)  # 77×448×832 through the Wan2.1 VAE
TEXT_DIM = 4096  # UMT5
SMOKE_LATENT_SHAPE, SMOKE_TEXT_DIM = (4, 5, 8, 16), 32  # --smoke: the tiny recipes' rows
GPU_ROWS_PER_S = 1 / 3.0  # one H100: ~3 s per row (batch 1) for 1.3B Sparse-distill at 77×448×832


def write_dataset(root: Path, rows: int, one_group_per_file: bool, shape: tuple[int, ...], text_dim: int,
                  seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    writer = LatentParquetWriter(root, rows_per_file=8)
    for i in range(rows):
        latents = rng.standard_normal(shape, dtype=np.float32)
        text = rng.standard_normal((int(rng.integers(60, 140)), text_dim), dtype=np.float32)
        writer.write(f"clip_{i:06d}", f"synthetic caption {i}", text, latents, height=448, width=832, fps=16.0)
    writer.close()
    if one_group_per_file:  # rewrite each file as a single row group, like FastVideo's writer
        for path in root.rglob("*.parquet"):
            table = pq.read_table(path).cast(LATENT_SCHEMA)
            pq.write_table(table, path, compression="zstd", row_group_size=table.num_rows)


def measure(root: Path, workers: int, steps: int, warmup: int, shape: tuple[int, ...]) -> float:
    ds = LatentDataset(str(root), expect_latent_shape=shape)
    loader = iter(make_loader(ds, batch_size=1, dp_rank=0, dp_size=1, seed=0, num_workers=workers,
                              num_steps=warmup + steps))
    for _ in range(warmup):
        next(loader)
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(loader)
    elapsed = time.perf_counter() - start
    assert batch["latents"].shape == (1, *shape)
    return steps / elapsed


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=48)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--steps", type=int, default=40, help="timed batches (batch 1)")
    p.add_argument("--dir", help="where to write the temp dataset (default: system temp)")
    p.add_argument("--smoke", action="store_true", help="8 small rows, 4 steps, no workers")
    args = p.parse_args(argv)
    shape, text_dim = LATENT_SHAPE, TEXT_DIM
    if args.smoke:
        args.rows, args.steps, args.workers = 8, 4, 0
        shape, text_dim = SMOKE_LATENT_SHAPE, SMOKE_TEXT_DIM
    if args.steps + 8 > 2 * args.rows:
        sys.exit("error: --steps + warm-up must fit in two epochs of --rows")
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_", dir=args.dir))
    try:
        print(f"rows {shape} float32 latents ({np.prod(shape) * 4 / 2**20:.1f} MiB) + ~100x{text_dim} text; "
              f"{args.rows} rows, {args.workers} workers, batch 1")
        for name, grouped in (("ours: row group per row", False), ("published: row group per 8-row file", True)):
            root = tmp / ("grouped" if grouped else "rows")
            t0 = time.perf_counter()
            write_dataset(root, args.rows, grouped, shape, text_dim)
            written = time.perf_counter() - t0
            rate = measure(root, args.workers, args.steps, warmup=8, shape=shape)
            print(f"{name:38s} write {args.rows / written:6.2f} rows/s | load {rate:7.2f} rows/s | "
                  f"margin vs one H100 ({GPU_ROWS_PER_S:.2f} rows/s): {rate / GPU_ROWS_PER_S:6.1f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
