"""CPU smoke runs of benchmarks/ and scripts/: each GPU measurement's code path at toy size, run as the script it is, so
none can rot silently. Each test checks the printed table: the expected rows, and numbers that are finite and agree
with each other where they must (an average of its parts, a ratio of its columns). Timing values themselves mean
nothing here. (scripts/check_speedups_gpu.py: tests/test_speedups_exact.py; scripts/probe_toy_factors.py:
tests/test_synthetic.py; scripts/demo.py and eval_toy.py: tests/test_toy_recipes.py.)"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A fresh one-process group in every script: not the torchrun variables an in-process recipe test may have left.
ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                        "MASTER_PORT", "TRITON_INTERPRET")}
NUMBER = r"[-+]?(?:\d+\.?\d*(?:e[-+]?\d+)?|nan|inf)"


def run(script: str, *args: str, env: dict | None = None, launcher: tuple[str, ...] = ()) -> str:
    proc = subprocess.run([sys.executable, *launcher, str(ROOT / script), *args], capture_output=True, text=True,
                          cwd=ROOT, env={**ENV, **(env or {})}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def numbers(line: str) -> list[float]:
    return [float(x) for x in re.findall(NUMBER, line)]


def test_bench_attention_smoke():
    out = run("benchmarks/bench_attention.py", "--smoke", env={"TRITON_INTERPRET": "1"})
    lines = out.splitlines()
    table = lines[lines.index(next(x for x in lines if x.startswith("shape       ρ"))) + 1:]
    (row,) = [x for x in table if x.startswith("smoke ")][:1]
    # smoke 0.5  dense fwd / f+b  op fwd / f+b  speedup fwd x / f+b x  fine fwd / f+b  TF/s fwd / f+b  (tile / tile)
    sparsity, dense_fwd, dense_fb, op_fwd, op_fb, up_fwd, up_fb, *_ = numbers(row.removeprefix("smoke"))
    assert sparsity == 0.5 and all(math.isfinite(v) and v > 0 for v in (dense_fwd, dense_fb, op_fwd, op_fb))
    # the speed-ups are the ratio of the columns, printed to 2 decimals
    assert up_fwd == pytest.approx(dense_fwd / op_fwd, rel=0.01, abs=6e-3)
    assert up_fb == pytest.approx(dense_fb / op_fb, rel=0.01, abs=6e-3)
    boxes = [x for x in lines if x.startswith("smoke") and "->" in x]
    assert len(boxes) == 1 and all(math.isfinite(v) for v in numbers(boxes[0].removeprefix("smoke")))


def test_bench_model_smoke():
    out = run("benchmarks/bench_model.py", "--smoke")
    rows = {name: float(ms) for name, ms in re.findall(r"^(ours \(cuDNN SDPA\)|diffusers WanTransformer3DModel)\s+"
                                                       rf"({NUMBER})$", out, re.M)}
    assert set(rows) == {"ours (cuDNN SDPA)", "diffusers WanTransformer3DModel"}
    assert all(math.isfinite(ms) and ms > 0 for ms in rows.values())
    share = next(x for x in out.splitlines() if x.startswith("attention share (ours)"))
    percent, delta, full = numbers(share.removeprefix("attention share (ours)"))
    # The row prints delta to 0.1 ms: its rounding (up to 0.05 ms) bounds how well the printed share can be recomputed.
    assert full == pytest.approx(rows["ours (cuDNN SDPA)"], abs=0.06)
    assert percent == pytest.approx(100 * delta / full, abs=100 * 0.05 / full + 0.1)


def test_bench_data_smoke():
    out = run("benchmarks/bench_data.py", "--smoke")
    rows = [x for x in out.splitlines() if "rows/s |" in x]
    assert [x.split(":")[0] for x in rows] == ["ours", "published"]
    for row in rows:
        # "ours: ... write W rows/s | load L rows/s | margin vs one H100 (G rows/s): M x"
        match = re.search(rf"write\s+({NUMBER}) rows/s \| load\s+({NUMBER}) rows/s \| margin vs one H100 "
                          rf"\(({NUMBER}) rows/s\):\s+({NUMBER})x", row)
        assert match, row
        write, load, gpu, margin = (float(v) for v in match.groups())
        assert all(math.isfinite(v) and v > 0 for v in (write, load, margin))
        assert margin == pytest.approx(load / gpu, rel=0.02)


def test_bench_optimizer_smoke():
    out = run("benchmarks/bench_optimizer.py", "--preset", "tiny", "--iters", "1")
    rows = re.findall(rf"^((?:FSDP \(DTensor\)|plain) (?:sharded|fused|foreach))\s+({NUMBER})\s+({NUMBER})$", out, re.M)
    assert [name for name, _, _ in rows] == [f"{kind} {opt}" for kind in ("FSDP (DTensor)", "plain")
                                             for opt in ("sharded", "fused", "foreach")]
    assert all(math.isfinite(float(host)) and float(host) > 0 for _, host, _ in rows)  # device ms: nan off CUDA


@pytest.mark.slow
def test_bench_train_smoke(tmp_path):
    """The recipe as a subprocess through the benchmark's overlay: 5 timed steps, the average of its parts."""
    out = run("benchmarks/bench_train.py", "--smoke", "--work", str(tmp_path))
    assert "timed steps: 5 (steps 6-10)" in out
    steps = numbers(next(x for x in out.splitlines() if x.startswith("step times (s):")).split(":")[1])
    result = dict(re.findall(rf"(\w+)=({NUMBER})", next(x for x in out.splitlines() if x.startswith("RESULT"))))
    avg, critic, student = (float(result[k]) for k in ("avg_step_s", "critic_step_s", "student_step_s"))
    assert len(steps) == 5 and all(s > 0 for s in steps)
    assert avg == pytest.approx((4 * critic + student) / 5, abs=2e-3)  # steps 6-9 critic only, step 10 student too
    assert student == pytest.approx(steps[-1], abs=6e-3)
    run_dir = tmp_path / "runs" / "wan21_1_3b_sparse_distill" / "tiny_L2_none_eager_n1_dp1_sp1"
    assert any((run_dir / "export").rglob("config.json"))  # the recipe ran to its end


@pytest.mark.multiproc
def test_bench_lora_smoke():
    """Both LoRA variants time against the base block, and the composition table holds the properties docs/DESIGN.md
    chose our LoRALinear for: base keys kept, adapter switches leave requires_grad alone, compile + FSDP2 == eager,
    DCP round trip; the FP8 swap refuses our unmerged adapter instead of dropping it."""
    out = run("benchmarks/bench_lora.py", "--smoke").splitlines()
    timing = {label: numbers(x[len(label):]) for x in out for label in
              ("base (no adapter)", "ours: models/lora.py LoRALinear", "peft: inject_adapter_in_model")
              if x.startswith(label)}
    base_eager, _, base_compiled, _ = timing["base (no adapter)"]
    assert len(timing) == 3 and min(base_eager, base_compiled) > 0
    for eager, eager_ratio, compiled, compiled_ratio in timing.values():  # ms and the ratio to the base block
        assert eager_ratio == pytest.approx(eager / base_eager, abs=0.01)
        assert compiled_ratio == pytest.approx(compiled / base_compiled, abs=0.01)
    table = out[next(i for i, x in enumerate(out) if x.startswith("composition")) + 1:]
    rows = {x[:40].strip(): x[41:] for x in table}  # check (40 wide), ours, peft
    for check in ("base keys unchanged", "compile + FSDP2 fwd/bwd == eager", "DCP save/load round trip",
                  "adapter switch keeps requires_grad", "fused rows swap keeps unmerged adapter"):
        assert rows[check].startswith("yes"), (check, rows[check])
    assert rows["fp8 swap keeps unmerged adapter"].startswith("no (refused up front: ValueError)")
    assert "base_layer" in rows["base keys unchanged"]  # peft's column: the renamed base parameter


def test_check_parallel_gpu_smoke():
    """scripts/check_parallel_gpu.py's SP checks on CPU (gloo, 2 ranks): SP=2 equals SP=1 within bf16 rounding."""
    out = run("scripts/check_parallel_gpu.py", "--cpu", "--only", "sp",
              launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
    table = out.split("\ncheck ")[-1].splitlines()[1:]
    assert [x.split("(")[0].strip() for x in table] == ["SP2 vs SP1 tiny sdpa", "SP2 vs SP1 tiny vsa"]
    assert all(x.endswith("ok") for x in table)


def test_gpu_acceptance_script_runs_the_stack_checks():
    """scripts/gpu_acceptance.sh rejects an unknown layout and runs the GPU checks of the training stack (that they
    exist: test_shell_scripts_parse_and_name_existing_files)."""
    script = ROOT / "scripts" / "gpu_acceptance.sh"
    proc = subprocess.run(["bash", str(script), "octo"], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert proc.returncode == 2 and "usage:" in proc.stderr
    named = set(re.findall(r"\b((?:benchmarks|scripts|tools|recipes|tests/assets)/[\w./]+\.(?:py|toml))",
                           script.read_text()))
    assert {"benchmarks/bench_train.py", "scripts/check_parallel_gpu.py", "tools/make_tiny_data.py"} <= named


@pytest.mark.parametrize("script", sorted(str(p.relative_to(ROOT)) for p in
                                          [*(ROOT / "scripts").glob("*.sh"), *(ROOT / "recipes/slurm").glob("*")]))
def test_shell_scripts_parse_and_name_existing_files(script):
    """The GPU study scripts and the Slurm launchers (run only on GPU machines) parse, and every file they run
    exists."""
    path = ROOT / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    named = set(re.findall(r"\b((?:benchmarks|scripts|tools|recipes|tests/assets)/[\w./]+\.(?:py|toml|sh))",
                           path.read_text()))
    assert named, f"{script} names no file of this repository"
    missing = sorted(n for n in named if not (ROOT / n).exists())
    assert not missing, missing


@pytest.mark.parametrize("model", ["wan22_t2v_a14b", "wan22_i2v_a14b"])
def test_check_a14b_sampling_gpu_smoke(model):
    """The README's A14B sampling row: its RESULT line's totals follow from its own per-step times."""
    out = run("scripts/check_a14b_sampling_gpu.py", "--smoke", "--model", model)
    (line,) = [x for x in out.splitlines() if x.startswith("RESULT ")]
    r = json.loads(line.removeprefix("RESULT "))
    assert r["model"] == model and r["latent_shape"] == [1, 4, 3, 8, 8] and r["teacher_total_steps"] == 6
    assert r["teacher_total_s"] == pytest.approx(r["teacher_s_per_step"] * r["teacher_total_steps"], abs=0.01)
    assert r["speedup"] == pytest.approx(r["teacher_s_per_step"] * r["teacher_total_steps"] / r["student_s"],
                                         rel=0.05, abs=0.1)
