"""Reading video files into the pixel tensors the VAE encodes (tools/preprocess.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def read_clip(path: Path, height: int, width: int, num_frames: int, fps: float) -> tuple[torch.Tensor, float, float] | None:
    """First `num_frames` frames at `fps`, resized to cover (height, width) and center-cropped.

    Returns (video (3, F, H, W) in [-1, 1], source fps, source duration s), or None when the clip is too short.
    """
    import imageio.v2 as imageio

    reader = imageio.get_reader(path, "ffmpeg")
    try:
        meta = reader.get_meta_data()
        src_fps = float(meta.get("fps") or fps)
        duration = float(meta.get("duration") or 0.0)
        wanted = [round(i * src_fps / fps) for i in range(num_frames)]  # source frame index of each output frame
        picked: dict[int, np.ndarray] = {}
        for j, frame in enumerate(reader):
            if j in wanted:
                picked[j] = frame[..., :3]
            if j >= wanted[-1]:
                break
    finally:
        reader.close()
    if wanted[-1] not in picked:
        return None
    frames = torch.from_numpy(np.stack([picked[j] for j in wanted]))  # (F, H0, W0, 3) uint8
    frames = frames.permute(0, 3, 1, 2).float()  # (F, 3, H0, W0)
    h0, w0 = frames.shape[-2:]
    scale = max(height / h0, width / w0)
    size = (max(height, math.ceil(h0 * scale)), max(width, math.ceil(w0 * scale)))
    if size != (h0, w0):
        frames = F.interpolate(frames, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    frames = frames[:, :, top : top + height, left : left + width]  # (F, 3, H, W)
    video = (frames / 127.5 - 1.0).clamp(-1, 1).permute(1, 0, 2, 3)  # (3, F, H, W)
    return video.contiguous(), src_fps, duration
