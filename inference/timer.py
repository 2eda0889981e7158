"""Seconds per named stage of a sampling run, without host syncs on the GPU.

    timer = StageTimer(device)
    with timer.stage("denoise step 1"):
        ...
    print(timing_table(timer.seconds(), num_frames=81, title="outputs/samples/00_a_cat.mp4"))
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Iterator

import torch


class StageTimer:
    """Seconds per named stage: CUDA events on GPU (read once at the end, so no host syncs), perf_counter on CPU."""

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.marks: dict[str, tuple[Any, Any]] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = torch.cuda.Event(enable_timing=True) if self.cuda else time.perf_counter()
        if self.cuda:
            start.record()
        yield
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
        else:
            end = time.perf_counter()
        self.marks[name] = (start, end)

    def seconds(self) -> dict[str, float]:
        """{stage: seconds} in the order the stages ran; synchronizes the GPU once."""
        if self.cuda:
            torch.cuda.synchronize()
            return {name: s.elapsed_time(e) / 1000 for name, (s, e) in self.marks.items()}
        return {name: e - s for name, (s, e) in self.marks.items()}


def timing_table(seconds: dict[str, float], num_frames: int, title: str) -> str:
    """The stages (denoise steps summarised past 8 of them: the teacher's 50), denoise and end-to-end totals, and
    frames per second of denoise + VAE decode."""
    steps = [s for name, s in seconds.items() if name.startswith("denoise")]
    denoise, decode = sum(steps), seconds.get("VAE decode", 0.0)
    rows = list(seconds.items())
    if len(steps) > 8:
        rows = [r for r in rows if not r[0].startswith("denoise")]
        rows.insert(1 if "text encode" in seconds else 0, (f"denoise steps ({len(steps)}), mean", denoise / len(steps)))
    rows += [("denoise total", denoise), ("denoise + decode", denoise + decode)]
    lines = [f"\n{title}", f"{'stage':34s} {'seconds':>9s}"]
    lines += [f"{name:34s} {s:9.3f}" for name, s in rows]
    lines.append(f"{'frames/s (frames / (denoise+decode))':34s} {num_frames / max(denoise + decode, 1e-9):9.2f}")
    return "\n".join(lines)
