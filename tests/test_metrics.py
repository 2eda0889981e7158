"""components/metrics.py: TensorBoard scalars and images read back, metrics.jsonl content, stdout, mp4 round-trip."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from components.metrics import MetricsLogger, read_video_info, write_video


def load_events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_log_writes_tensorboard_jsonl_and_stdout(tmp_path: Path, capsys):
    metrics = MetricsLogger(tmp_path, stdout_every=20)
    metrics.log(10, {"loss/dmd": torch.tensor(0.125), "loss/critic": 0.5, "time/step_s": 2.31})
    metrics.log(20, {"loss/dmd": torch.tensor(float("nan")), "grad_norm/student": torch.tensor(3, dtype=torch.int64),
                     "dmd/denom": float("inf")})
    metrics.close()

    acc = load_events(tmp_path)
    assert [(e.step, e.value) for e in acc.Scalars("loss/dmd")][0] == (10, 0.125)
    assert math.isnan(acc.Scalars("loss/dmd")[1].value)  # non-finite values are logged as they are
    assert [(e.step, e.value) for e in acc.Scalars("loss/critic")] == [(10, 0.5)]
    assert acc.Scalars("grad_norm/student")[0].value == 3.0

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [
        {"step": 10, "loss/dmd": 0.125, "loss/critic": 0.5, "time/step_s": 2.31},
        {"step": 20, "loss/dmd": None, "grad_norm/student": 3.0, "dmd/denom": None},
    ]
    out = capsys.readouterr().out.splitlines()
    assert out == ["step 20 | loss/dmd nan | grad_norm/student 3 | dmd/denom inf"]  # step 10 % 20 != 0


def test_jsonl_is_appended_across_loggers(tmp_path: Path):
    for step in (1, 2):  # a resumed run opens a second logger on the same run directory
        metrics = MetricsLogger(tmp_path)
        metrics.log(step, {"loss/dmd": float(step)})
        metrics.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


def test_disabled_logger_writes_nothing(tmp_path: Path, capsys):
    run_dir = tmp_path / "rank1"
    metrics = MetricsLogger(run_dir, enabled=False)
    metrics.log(1, {"loss/dmd": torch.tensor(1.0)})
    metrics.video("val/sample", 1, np.zeros((2, 4, 4, 3), np.uint8), fps=8)
    metrics.close()
    assert not run_dir.exists() and capsys.readouterr().out == ""


def test_non_scalar_tensor_and_bad_frames_are_rejected(tmp_path: Path):
    metrics = MetricsLogger(tmp_path)
    with pytest.raises(ValueError, match=r"metric 'loss/dmd' must be a 0-dim tensor.*\(2,\)"):
        metrics.log(1, {"loss/dmd": torch.ones(2)})
    with pytest.raises(ValueError, match=r"frames must be \(T, H, W, 3\) uint8.*float32"):
        metrics.video("val/sample", 1, np.zeros((2, 4, 4, 3), np.float32), fps=8)
    with pytest.raises(ValueError, match=r"frames must be.*shape \(2, 3, 4, 4\)"):
        metrics.video("val/sample", 1, np.zeros((2, 3, 4, 4), np.uint8), fps=8)
    metrics.close()


def test_video_in_tensorboard_shows_first_and_last_frames(tmp_path: Path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(9, 6, 10, 3), dtype=np.uint8)
    metrics = MetricsLogger(tmp_path)
    metrics.video("val/sample_0", 30, torch.from_numpy(frames), fps=8)
    metrics.close()

    (event,) = load_events(tmp_path).Images("val/sample_0")
    image = imageio.imread(io.BytesIO(event.encoded_image_string), format="png")  # PNG: lossless
    assert event.step == 30 and image.shape == (6, 4 * 10, 3)
    np.testing.assert_array_equal(image[:, :10], frames[0])
    np.testing.assert_array_equal(image[:, -10:], frames[-1])
    middle = [image[:, 10 * i : 10 * (i + 1)] for i in (1, 2)]
    assert all(any(np.array_equal(m, f) for f in frames[1:-1]) for m in middle)


@pytest.mark.parametrize("height, width", [(16, 24), (15, 21)])
def test_write_video_round_trip(tmp_path: Path, height: int, width: int):
    levels = np.linspace(20, 235, 12).astype(np.uint8)
    frames = np.broadcast_to(levels[:, None, None, None], (12, height, width, 3)).copy()  # one flat grey per frame
    path = tmp_path / "samples" / "step-000010" / "prompt_0.mp4"
    write_video(path, torch.from_numpy(frames), fps=16)

    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["prompt_0.mp4"]  # temp file renamed
    # odd sizes are padded by one row / column to the next even size (yuv420p)
    assert read_video_info(path) == (12, height + height % 2, width + width % 2)
    with imageio.get_reader(path, format="FFMPEG") as reader:
        decoded = np.stack([frame for frame in reader])  # not list(reader): its length hint is inf
    # lossy H.264: flat frames come back within a few levels, in order
    np.testing.assert_allclose(decoded.reshape(12, -1).mean(axis=1), levels, atol=3)


def test_missing_ffmpeg_fails_when_the_logger_starts(tmp_path: Path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # as if the package were not installed
    with pytest.raises(RuntimeError, match="pip install imageio-ffmpeg"):
        MetricsLogger(tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing written before the check
    MetricsLogger(tmp_path / "other", enabled=False)  # ranks that do not log do not need it
