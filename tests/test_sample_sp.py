"""Sampling over several gloo ranks (inference/parallel.py) == the same sampling in one process (CPU, fp32).

The reference is a one-process `VideoPipeline` over the same tiny diffusers-written pipeline folder: sequence parallel
(and CFG-parallel) must not change the latents beyond float round-off. Cases: the student with VSA (sparsity 0.5,
a non-zero gate, ragged tiles, a token count no rank count divides), in fp32, with FP8 linears and with an image as
latent frame 0 (TI2V: per-token timesteps, the image encoded on rank 0 and broadcast); the CFG teacher over sp ranks
and with its two branches on two rank groups; 2 and 4 ranks. Plus: rank 0 alone decodes and writes
(`torchrun tools/sample.py`), and the errors (heads, token grid, ranks, prompts that differ between ranks).
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from inference.parallel import check_sampling_sizes, check_token_grid
from inference.pipeline import VideoPipeline
from models.wan_weights import export_pretrained, load_pretrained
from tests.multiproc import run_multiproc
from tests.tiny_pipeline import TINY_TEXT_DIM, TINY_Z_DIM, build_tiny_pipeline

pytestmark = pytest.mark.multiproc

ROOT = Path(__file__).resolve().parents[1]
# 4 heads so that 4 ranks can split them; head_dim 16 keeps every RoPE axis non-trivial (8/4/4 channels).
TINY_DIT = {
    "patch_size": (1, 2, 2), "num_attention_heads": 4, "attention_head_dim": 16, "in_channels": TINY_Z_DIM,
    "out_channels": TINY_Z_DIM, "text_dim": TINY_TEXT_DIM, "freq_dim": 32, "ffn_dim": 128, "num_layers": 2,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024,
}
PROMPT = "a red car drives on the street"
# 9 frames of 48x144 -> latents (1, 4, 3, 6, 18) -> token grid (3, 3, 9): 81 tokens (SP padding at 2 and 4 ranks),
# three ragged 4x4x4 VSA tiles of which sparsity 0.5 keeps two per query tile.
STUDENT = {"num_frames": 9, "height": 48, "width": 144, "seed": 7, "sparsity": 0.5}
# 5 frames of 32x64 -> token grid (2, 2, 4); 3 UniPC steps.
SMALL = {"num_frames": 5, "height": 32, "width": 64}
TEACHER = {**SMALL, "seed": 11, "teacher": True, "teacher_steps": 3, "guidance": 4.0, "shift": 3.0}
REL_TOL = 1e-5


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory) -> Path:
    """A tiny pipeline whose transformer has a random VSA gate, as the FastWan students have one; it accepts an
    image (TI2V, as Wan2.2-TI2V-5B: `expand_timesteps`), and `first_frame.png` is one."""
    from PIL import Image

    path = build_tiny_pipeline(tmp_path_factory.mktemp("pipe"), transformer_config=TINY_DIT)
    model = load_pretrained(path, vsa_gate=True)
    torch.manual_seed(3)
    with torch.no_grad():
        for block in model.blocks:
            block.attn1.to_gate_compress.weight.normal_(0, 0.2)
    export_pretrained(model, path / "transformer")
    index = json.loads((path / "model_index.json").read_text())
    (path / "model_index.json").write_text(json.dumps({**index, "expand_timesteps": True}))
    pixels = torch.randint(0, 256, (40, 150, 3), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(path / "first_frame.png")
    return path


def _pipeline(path: Path, **kwargs) -> VideoPipeline:
    return VideoPipeline.from_pretrained(path, device="cpu", dtype=torch.float32, attn="vsa", **kwargs)


def _latents(pipe: VideoPipeline, kind: str, path: Path) -> torch.Tensor:
    """kind: "student" (VSA), "teacher" (CFG) or "ti2v" (the student with `first_frame.png` as latent frame 0)."""
    if kind == "teacher":
        context = pipe.encode_prompts([PROMPT, "blurry static"])
        return pipe.denoise(context[:1], negative_context=context[1:], progress=False, **TEACHER)
    image = path / "first_frame.png" if kind == "ti2v" else None
    return pipe.denoise(pipe.encode_prompts([PROMPT]), image=image, progress=False, **STUDENT)


def _forwards(pipe: VideoPipeline) -> list[int]:
    """A counter of the DiT's forwards."""
    calls = [0]
    pipe.dit.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


# (name, VideoPipeline kwargs, kind) per world size. 4 ranks: only what 2 cannot show (sp 4, CFG-parallel with sp
# inside each branch): every process costs seconds of imports on the 2-core CI machine.
def _cases(world: int) -> list[tuple[str, dict, str]]:
    if world == 4:
        return [("student sp", {"sp": 4}, "student"),
                ("teacher cfg-parallel", {"sp": 2, "cfg_parallel": True}, "teacher")]
    return [("student sp", {"sp": 2}, "student"), ("student sp fp8", {"sp": 2, "fp8": True}, "student"),
            ("ti2v student sp", {"sp": 2}, "ti2v"), ("teacher sp", {"sp": 2}, "teacher"),
            ("teacher cfg-parallel", {"sp": 1, "cfg_parallel": True}, "teacher")]


def _sample_rank(rank: int, world: int, path: Path) -> dict:
    out = {}
    for name, kwargs, kind in _cases(world):
        pipe = _pipeline(path, **kwargs)
        calls = _forwards(pipe)
        out[name] = {"latents": _latents(pipe, kind, path), "forwards": calls[0],
                     "shard": type(pipe.dit.token_shard).__name__}
    if world == 2:  # the errors that need a process group, raised on every rank before any sampling
        pipe = _pipeline(path, sp=2)
        out["video"] = pipe(PROMPT, progress=False, **SMALL)  # rank 0 alone decodes
        for name, call in (
            ("prompt", lambda: pipe(PROMPT if rank == 0 else "a blue car", progress=False, **STUDENT)),
            ("grid", lambda: pipe(PROMPT, progress=False, **{**STUDENT, "num_frames": 1, "height": 16, "width": 16})),
            ("student cfg-parallel", lambda: _latents(_pipeline(path, sp=1, cfg_parallel=True), "student", path)),
        ):
            try:
                call()
                out[f"error {name}"] = None
            except ValueError as e:
                out[f"error {name}"] = str(e)
        dist.barrier()
    return out


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("world", [2, 4])
def test_sp_sampling_equals_one_process(pipe_dir, world):
    ranks = run_multiproc(_sample_rank, world, pipe_dir, timeout=240)
    single = {}
    for name, kwargs, kind in _cases(world):
        pipe = _pipeline(pipe_dir, fp8=kwargs.get("fp8", False))
        calls = _forwards(pipe)
        single[name] = (_latents(pipe, kind, pipe_dir), calls[0])
    for name, kwargs, _ in _cases(world):
        ref, ref_forwards = single[name]
        for rank, result in enumerate(ranks):
            got = result[name]
            assert _rel_err(got["latents"], ref) <= REL_TOL, f"{name}, rank {rank} of {world}"
            sp = kwargs["sp"]
            assert got["shard"] == ("SequenceShard" if sp > 1 else "TokenShard"), f"{name}: Ulysses seam"
            # CFG-parallel: each rank runs one branch, half the forwards of one process.
            expected = ref_forwards // 2 if kwargs.get("cfg_parallel") else ref_forwards
            assert got["forwards"] == expected, f"{name}, rank {rank}: {got['forwards']} DiT forwards"
    if world == 2:
        ti2v, t2v = single["ti2v student sp"][0], single["student sp"][0]
        assert not torch.allclose(ti2v[:, :, 0], t2v[:, :, 0]), "the image must condition latent frame 0"
        video, nothing = ranks[0]["video"], ranks[1]["video"]
        assert nothing is None and video.dtype == torch.uint8 and video.shape == (5, 32, 64, 3)
        assert all("'prompt'" in r["error prompt"] and "[1]" in r["error prompt"] for r in ranks)
        assert all("too small for sp=2" in r["error grid"] for r in ranks)
        assert all("student has none" in (r["error student cfg-parallel"] or "") for r in ranks)


def test_torchrun_cli_rank0_writes(pipe_dir, tmp_path):
    """`torchrun --nproc_per_node 2 tools/sample.py`: rank 0's files hold the one-process latents; rank 1 prints and
    writes nothing."""
    out, logs = tmp_path / "out", tmp_path / "logs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--log-dir",
           str(logs), "--redirects", "3", str(ROOT / "tools" / "sample.py"), "--model", str(pipe_dir), "--prompt",
           PROMPT, "--device", "cpu", "--dtype", "fp32", "--attn", "vsa", "--out", str(out), "--save-latents",
           "--num-frames", "9", "--height", "48", "--width", "144", "--seed", "7", "--sparsity", "0.5"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, check=False)
    rank_logs = {r: "".join(Path(p).read_text() for p in glob.glob(f"{logs}/**/{r}/std*.log", recursive=True))
                 for r in (0, 1)}
    assert run.returncode == 0, run.stderr[-3000:] + rank_logs[0][-2000:] + rank_logs[1][-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["00_a_red_car_drives_on_the_street.latents.pt", "00_a_red_car_drives_on_the_street.mp4"]
    assert "denoise total" in rank_logs[0] and "denoise total" not in rank_logs[1]
    assert ".mp4" not in rank_logs[1]
    ref = _latents(_pipeline(pipe_dir), "student", pipe_dir)
    assert _rel_err(torch.load(out / files[0]), ref) <= REL_TOL


def test_size_errors(pipe_dir):
    with pytest.raises(ValueError, match=r"sp=3 does not divide the model's 4 attention heads.*valid sp: \[1, 2, 4\]"):
        check_sampling_sizes(3, False, 4, world=3)
    with pytest.raises(ValueError, match=r"sp=2 × 2 CFG branches = 4 ranks, but the process group has 2"):
        check_sampling_sizes(2, True, 4, world=2)
    with pytest.raises(ValueError, match=r"grid \(1, 1, 3\) = 3 tokens is too small for sp=4.*at most 3 ranks fit"):
        check_token_grid((1, 1, 3), 4)
    check_token_grid((1, 1, 7), 4)  # chunks of 2: the last rank holds 1 real token
    # No process group: asking for 2 ranks fails before any weights are read.
    with pytest.raises(ValueError, match=r"sp=2 = 2 ranks, but the process group has 1: launch with `torchrun"):
        _pipeline(pipe_dir, sp=2)
