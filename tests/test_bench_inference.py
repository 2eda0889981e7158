"""benchmarks/bench_inference.py --smoke: every case and variant of the GPU benchmark runs at toy size on the CPU, and
its derived numbers follow from its measured ones."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_inference.py"
FP8 = "fp8 linears + fp8 attention"


def bench_rows(tmp_path: Path, *args: str) -> dict[str, float]:
    out = tmp_path / "rows.json"
    run = subprocess.run([sys.executable, str(BENCH), "--smoke", "--json", str(out), *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return {row["what"]: row["value"] for row in json.loads(out.read_text())}


@pytest.mark.slow
def test_bench_inference_smoke_runs_every_case(tmp_path):
    """speedup = 50 teacher CFG steps / student; frames/s = 81 / (denoise + fastest decode); --pipeline: the same
    denoise through VideoPipeline and its ratio to the sampler's time."""
    rows = bench_rows(tmp_path, "--cases", "a,b,c", "--diffusers", "--fp8", "--pipeline")
    for res in ("14B 81x480x832", "14B 81x720x1280"):
        student = rows[f"{res} student 3-step VSA 0.9"]
        for teacher in ("ours dense", "diffusers"):
            step = rows[f"{res} teacher CFG step (cond + uncond), {teacher}"]
            assert rows[f"{res} teacher 50-step CFG, {teacher}"] == pytest.approx(50 * step)
            assert rows[f"{res} denoising-loop speedup vs {teacher}"] == pytest.approx(50 * step / student)
        student_fp8 = rows[f"{res} student 3-step VSA 0.9, {FP8}"]
        assert rows[f"{res} student speedup, {FP8} vs bf16"] == pytest.approx(student / student_fp8)
        teacher = 50 * rows[f"{res} teacher CFG step (cond + uncond), ours dense"]
        speedup = rows[f"{res} denoising-loop speedup vs ours dense, {FP8} student"]
        assert speedup == pytest.approx(teacher / student_fp8)
    decode = min(v for k, v in rows.items() if k.startswith("VAE decode") and "first call" not in k)
    denoise = rows["1.3B 81x480x832 student 3-step VSA 0.8 denoise"]
    assert rows["end to end frames/s (81 frames / end to end)"] == pytest.approx(81 / (denoise + decode))
    denoise_fp8 = rows[f"1.3B 81x480x832 student 3-step VSA 0.8 denoise, {FP8}"]
    assert rows[f"1.3B student denoise speedup, {FP8} vs bf16"] == pytest.approx(denoise / denoise_fp8)
    frames_s_fp8 = rows[f"end to end frames/s, {FP8} (81 frames / end to end)"]
    assert frames_s_fp8 == pytest.approx(81 / (denoise_fp8 + decode))
    pipeline = rows[f"1.3B 81x480x832 student 3-step VSA 0.8 denoise through VideoPipeline, {FP8}"]
    assert rows[f"VideoPipeline / sampler denoise time, {FP8}"] == pytest.approx(pipeline / denoise_fp8)
    assert {"5B 121x704x1280 student 3-step dense", "5B 121x704x1280 student 3-step VSA 0.8"} <= set(rows)


def test_bench_inference_skip_ours_teacher(tmp_path):
    """--skip-ours-teacher: only diffusers' teacher is timed, the speed-ups follow from it."""
    rows = bench_rows(tmp_path, "--cases", "b", "--diffusers", "--skip-ours-teacher")
    assert not [what for what in rows if "ours dense" in what]
    step = rows["14B 81x480x832 teacher CFG step (cond + uncond), diffusers"]
    assert rows["14B 81x480x832 denoising-loop speedup vs diffusers"] == pytest.approx(
        50 * step / rows["14B 81x480x832 student 3-step VSA 0.9"])
