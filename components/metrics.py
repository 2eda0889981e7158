"""Run metrics: TensorBoard scalars, one JSON line per log step in `metrics.jsonl`, a compact stdout line; mp4 videos.

    metrics = MetricsLogger(run_dir, enabled=rank == 0)
    metrics.log(step, {"loss/dmd": loss, "time/step_s": dt})   # floats or 0-dim tensors, only on log steps
    metrics.video("val/sample_0", step, frames, fps=16)        # frames (T, H, W, 3) uint8
    metrics.close()
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter

VIDEO_PREVIEW_FRAMES = 4


class MetricsLogger:
    """Logs to `run_dir/tb/` (TensorBoard), `run_dir/metrics.jsonl` (appended) and stdout; a no-op when not enabled.

    The runs that log also write validation mp4s, so a missing ffmpeg fails here, before any model is built, rather
    than after the first training steps."""

    def __init__(self, run_dir: Path, enabled: bool = True, stdout_every: int = 1):
        self.enabled = enabled
        self.stdout_every = stdout_every  # print a stdout line on steps divisible by this
        if not enabled:
            return
        check_video_writer()
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(run_dir / "tb"))
        self.jsonl = open(run_dir / "metrics.jsonl", "a")  # append: a resumed run continues the same file

    def log(self, step: int, scalars: dict[str, float | torch.Tensor]) -> None:
        """Log scalars (Python numbers or 0-dim tensors); NaN/inf are kept (TensorBoard) or written as null (JSON)."""
        if not self.enabled:
            return
        values = to_floats(scalars)
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, step)
        self.writer.flush()
        # JSON has no NaN/Infinity: write null so the file stays parseable by any JSON reader.
        row = {"step": step, **{k: v if math.isfinite(v) else None for k, v in values.items()}}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if step % self.stdout_every == 0:
            print(" | ".join([f"step {step}"] + [f"{k} {v:.4g}" for k, v in values.items()]), flush=True)

    def video(self, tag: str, step: int, frames: np.ndarray | torch.Tensor, fps: int) -> None:
        """Show a video in TensorBoard as one image: a row of a few evenly spaced frames.

        TensorBoard's own add_video needs moviepy, which is not a dependency; the full clip is written as an mp4 with
        `write_video` instead. `fps` is accepted for that reason but unused here.
        """
        if not self.enabled:
            return
        frames = check_frames(frames)
        idx = np.linspace(0, len(frames) - 1, num=min(VIDEO_PREVIEW_FRAMES, len(frames))).round().astype(int)
        strip = np.concatenate(list(frames[idx]), axis=1)  # (H, n * W, 3)
        self.writer.add_image(tag, strip, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self.writer.close()
        self.jsonl.close()


def to_floats(scalars: dict[str, float | torch.Tensor]) -> dict[str, float]:
    """Python floats from numbers and 0-dim tensors, with a single device sync for all the tensors."""
    tensors = {k: v for k, v in scalars.items() if isinstance(v, torch.Tensor)}
    for k, v in tensors.items():
        if v.dim() != 0:
            raise ValueError(f"metric '{k}' must be a 0-dim tensor or a number, got a tensor of shape {tuple(v.shape)}")
    out = {k: float(v) for k, v in scalars.items() if k not in tensors}
    if tensors:
        device = next(iter(tensors.values())).device
        stacked = torch.stack([v.detach().to(device, torch.float64) for v in tensors.values()])  # (n,)
        out.update(zip(tensors, stacked.tolist()))
    return {k: out[k] for k in scalars}  # keep the caller's order for the stdout line


def reduce_for_log(logs: dict[str, float | torch.Tensor], prefixes: tuple[str, ...]) -> dict:
    """`logs` with its 0-dim tensors whose keys start with `prefixes` averaged over all ranks, in one all_reduce.

    Every rank must call it on the same keys (log steps only: it syncs). gloo has no AVG, so it sums and divides.
    """
    keys = [k for k in logs if k.startswith(prefixes)]
    if not keys or not dist.is_initialized():
        return dict(logs)
    total = torch.stack([logs[k].float() for k in keys])  # (n,)
    dist.all_reduce(total)
    return {**logs, **dict(zip(keys, total / dist.get_world_size()))}


def step_scalars(step_s: float, data_s: float, tokens: int, device: torch.device) -> dict[str, float]:
    """The per-step time, throughput and memory tags; memory is CUDA's peak reserved since start (0 off CUDA)."""
    mem = torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else 0.0
    return {"time/step_s": step_s, "time/data_s": data_s, "perf/tokens_per_s": tokens / step_s,
            "mem/max_reserved_gib": mem}


def check_video_writer() -> None:
    """A RuntimeError with the fix when imageio cannot find its ffmpeg backend (the `imageio-ffmpeg` package)."""
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as err:
        raise RuntimeError(f"mp4 output needs ffmpeg through imageio-ffmpeg ({err}): pip install imageio-ffmpeg") from err


def check_frames(frames: np.ndarray | torch.Tensor) -> np.ndarray:
    """Frames as a numpy (T, H, W, 3) uint8 array; anything else is a ValueError naming the shape and dtype."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"frames must be (T, H, W, 3) uint8 with T > 0, got shape {frames.shape} dtype {frames.dtype}")
    return frames


def write_video(path: Path, frames: np.ndarray | torch.Tensor, fps: int) -> None:
    """Write an H.264 mp4 (yuv420p, playable everywhere), atomically: a temp file in the same folder, then a rename."""
    frames = check_frames(frames)
    # yuv420p subsamples chroma 2x2, so H and W must be even: pad an odd edge by repeating the last row / column.
    _, h, w, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.mp4")  # ffmpeg picks the container from the suffix
    # macro_block_size=1: imageio would otherwise resize to a multiple of 16.
    writer = imageio.get_writer(tmp, format="FFMPEG", fps=fps, codec="libx264", pixelformat="yuv420p",
                                macro_block_size=1)
    try:
        for frame in frames:
            writer.append_data(frame)
        writer.close()
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def read_video_info(path: Path) -> tuple[int, int, int]:
    """(num_frames, height, width) of a video file, by decoding every frame."""
    reader = imageio.get_reader(Path(path), format="FFMPEG")
    try:
        num_frames, (height, width) = 0, (0, 0)
        for frame in reader:
            num_frames, (height, width) = num_frames + 1, frame.shape[:2]
    finally:
        reader.close()
    return num_frames, height, width
