"""The README's newcomer path, offline: a local tiny "hub" stands in for the Hugging Face downloads.

In a fresh working directory (recipes/, tools/, tests/ linked from the repository; nothing else), the README's three
commands run with the tiny CPU overlay and `--hub-dir` (the recipe and the sampler as subprocesses, prepare in this
process to save a start-up): tools/prepare.py downloads the 1.3B recipe's
pipeline (a tiny one written by diffusers' save_pretrained) and dataset (tiny latents in FastVideo's layout), encodes
the negative prompt and validation prompts, checks them and prints the launch and sampling commands; the recipe runs
2 steps from that launch command; tools/sample.py samples from the run's export. Checks: the written embeddings equal
the tiny UMT5 run directly through transformers; a second prepare reuses every file untouched; the recipe exits 0 with
a complete export; the mp4 has the requested frames and size. Also: a missing path is one error line naming the key
and the prepare command (no traceback); a data-free recipe gets its text-only data from --prompts, a latent recipe
refuses --prompts and caption-only data; the toy recipes need nothing or say what.
"""

from __future__ import annotations

import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from components.metrics import read_video_info
from data.dataset import LatentDataset, load_negative_context
from data.encode import NEGATIVE_PROMPTS
from data.writer import LatentParquetWriter
from tests.tiny_pipeline import TINY_TEXT_DIM, TINY_Z_DIM, build_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "wan21_1_3b_sparse_distill"
TINY = ["--toml", "tests/assets/tiny.toml"]  # 17 frames of 64x128 -> latents (4, 5, 8, 16)
LATENT_SHAPE = (TINY_Z_DIM, 5, 8, 16)


def readme_commands() -> list[list[str]]:
    """The commands of the README's newcomer block (between its `# newcomer path` markers)."""
    block = re.search(r"# newcomer path\n(.*?)# end of the newcomer path", (ROOT / "README.md").read_text(), re.S)
    assert block, "README.md has no newcomer block"
    return [shlex.split(line, comments=True) for line in block.group(1).splitlines() if line.strip()]


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    """<owner>/<name> folders as on the Hub: the tiny pipeline (no transformer: the tiny overlay's preset is random) and
    4 rows of tiny latents with 32-wide caption embeddings."""
    root = tmp_path_factory.mktemp("hub")
    build_tiny_pipeline(root / "Wan-AI" / "Wan2.1-T2V-1.3B-Diffusers")
    gen = torch.Generator().manual_seed(0)
    writer = LatentParquetWriter(root / "FastVideo" / "Wan-Syn_77x448x832_600k", rows_per_file=2)
    for i in range(4):
        text = torch.randn(3 + i, TINY_TEXT_DIM, generator=gen)
        writer.write(f"clip{i}", f"caption {i}", text, torch.randn(LATENT_SHAPE, generator=gen), height=64, width=128)
    writer.close()
    return root


@pytest.fixture
def checkout(tmp_path) -> Path:
    for name in ("recipes", "tools", "tests"):
        (tmp_path / name).symlink_to(ROOT / name)
    return tmp_path


def run(cwd: Path, command: list[str], expect: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    command = [sys.executable if command[0] == "python" else command[0], *command[1:]]
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == expect, f"{shlex.join(command)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def prepare(checkout: Path, capsys, argv: list[str], expect: str | None = None) -> str:
    """`python tools/prepare.py argv...` run in this process from `checkout`: its stdout, or its error message."""
    cwd, saved = Path.cwd(), sys.argv
    os.chdir(checkout)
    sys.argv = [str(checkout / "tools" / "prepare.py"), *argv]
    capsys.readouterr()
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
        assert expect is None, f"prepare did not fail with {expect!r}"
        return capsys.readouterr().out
    except SystemExit as e:
        assert expect is not None and expect in str(e.code), f"{e.code}\n{capsys.readouterr().out[-3000:]}"
        return str(e.code)
    finally:
        os.chdir(cwd)
        sys.argv = saved


def printed_commands(stdout: str) -> list[list[str]]:
    """The commands prepare prints after `ready:` (indented by four spaces)."""
    ready = stdout[stdout.index("ready:") :]
    return [shlex.split(line) for line in ready.splitlines() if line.startswith("    ")]


def umt5(pipe: Path, prompt: str) -> torch.Tensor:
    """The real-token states of `prompt` straight from transformers (independent of data/encode.py)."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    tokens = AutoTokenizer.from_pretrained(pipe / "tokenizer")(prompt, return_tensors="pt")
    with torch.no_grad():
        return UMT5EncoderModel.from_pretrained(pipe / "text_encoder")(**tokens).last_hidden_state[0]  # (L, D)


def test_readme_newcomer_path_offline(hub, checkout, capsys):
    prepare_cmd, launch, sample = readme_commands()
    assert prepare_cmd[:4] == ["python", "tools/prepare.py", "--recipe", RECIPE]
    assert f"recipes/{RECIPE}.py" in launch and sample[:2] == ["python", "tools/sample.py"]

    # 1. prepare: downloads from the stand-in hub, encodes, checks, prints the launch and sampling commands.
    out = prepare(checkout, capsys, [*prepare_cmd[2:], *TINY, "--hub-dir", str(hub)])
    pipe = checkout / "weights" / "Wan2.1-T2V-1.3B-Diffusers"
    prompts = checkout / "datasets" / "Wan2.1-T2V-1.3B-prompts"
    assert (pipe / "vae" / "config.json").is_file() and (pipe / "text_encoder" / "config.json").is_file()
    assert len(list((checkout / "datasets" / "Wan-Syn_77x448x832_600k").rglob("*.parquet"))) == 2
    negative = load_negative_context(prompts / "negative_prompt.safetensors")[0]  # (512, D)
    expected = umt5(pipe, NEGATIVE_PROMPTS["en"])
    torch.testing.assert_close(negative[: len(expected)], expected, atol=1e-5, rtol=1e-5)
    assert not negative[len(expected) :].any()
    val = LatentDataset(str(prompts / "validation"), text_only=True)
    assert len(val) == 8
    first = umt5(pipe, val[0]["caption"])
    torch.testing.assert_close(val[0]["context"][: len(first)], first, atol=1e-5, rtol=1e-5)
    train_cmd, sample_cmd = printed_commands(out)
    assert train_cmd == ["python", f"recipes/{RECIPE}.py", *TINY]

    # A second prepare reuses every file untouched.
    files = {p: p.stat().st_mtime_ns for p in [*(checkout / "weights").rglob("*"), *(checkout / "datasets").rglob("*")]}
    again = prepare(checkout, capsys, [*prepare_cmd[2:], *TINY, "--hub-dir", str(hub)])
    assert again.count(": reuse ") == 4 and "encode" not in again and "download" not in again
    assert {p: p.stat().st_mtime_ns for p in files} == files

    # 2. launch: the command prepare printed, 2 steps; the export is a pipeline folder.
    run(checkout, train_cmd)
    run_dir = checkout / "outputs" / RECIPE / "tiny"
    assert [line for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1].startswith('{"step": 2')
    export = run_dir / "export"
    assert (export / "transformer" / "config.json").is_file() and (export / "vae").resolve() == (pipe / "vae").resolve()

    # 3. sample from the export: the README's sample command on the run's export, at the tiny size prepare printed.
    model = sample_cmd[sample_cmd.index("--model") + 1]
    assert model == f"outputs/{RECIPE}/tiny/export" and sample[sample.index("--model") + 1].endswith("/export")
    videos = checkout / "videos"
    run(checkout, [*sample_cmd, "--device", "cpu", "--out", str(videos)])
    (mp4,) = videos.glob("*.mp4")
    assert read_video_info(mp4) == (17, 64, 128)  # frames, height, width


def test_missing_path_is_one_line_with_the_fix(checkout):
    proc = run(checkout, ["python", f"recipes/{RECIPE}.py", *TINY, "run.name=x"], expect=2)
    fix = f"python tools/prepare.py --recipe {RECIPE} --toml tests/assets/tiny.toml run.name=x"
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        f"error: model.base: weights/Wan2.1-T2V-1.3B-Diffusers does not exist; run: {fix}",
        f"error: data.path: datasets/Wan-Syn_77x448x832_600k does not exist; run: {fix}",
        f"error: data.negative_prompt: datasets/Wan2.1-T2V-1.3B-prompts/negative_prompt.safetensors does not exist; "
        f"run: {fix}",
        f"error: data.val_prompts: datasets/Wan2.1-T2V-1.3B-prompts/validation does not exist; run: {fix}",
    ]


def test_data_free_recipe_and_toy_recipes(hub, checkout, capsys, tmp_path_factory):
    """The 5B data-free recipe's data.path comes from --prompts (text only, no latents); the toy recipes need nothing
    (toy_teacher) or name the command that writes their input (toy_sparse_distill)."""
    five_b = tmp_path_factory.mktemp("hub5b")
    (five_b / "Wan-AI").mkdir()
    (five_b / "Wan-AI" / "Wan2.2-TI2V-5B-Diffusers").symlink_to(hub / "Wan-AI" / "Wan2.1-T2V-1.3B-Diffusers")
    captions = checkout / "captions.txt"
    captions.write_text("a cat\n\na red kite over the sea\na dog runs\n")
    argv = ["--recipe", "wan22_ti2v_5b_sparse_distill", *TINY, "--hub-dir", str(five_b)]
    error = prepare(checkout, capsys, argv, expect="data.path: datasets/Wan2.2-TI2V-5B-prompts/train does not exist")
    assert "give --prompts FILE" in error
    out = prepare(checkout, capsys, [*argv, "--prompts", str(captions)])
    train = LatentDataset(str(checkout / "datasets" / "Wan2.2-TI2V-5B-prompts" / "train"), text_only=True)
    assert [train[i]["caption"] for i in range(len(train))] == ["a cat", "a red kite over the sea", "a dog runs"]
    assert "3 rows, text only" in out
    assert printed_commands(out)[0] == ["python", "recipes/wan22_ti2v_5b_sparse_distill.py", *TINY]

    out = prepare(checkout, capsys, ["--recipe", "toy_teacher"])
    assert "nothing to download" in out and printed_commands(out) == [["python", "recipes/toy_teacher.py"]]
    error = prepare(checkout, capsys, ["--recipe", "toy_sparse_distill"], expect="model.teacher")
    assert error == (
        "error: model.teacher: outputs/toy_teacher/demo/teacher does not exist; it is the toy teacher's export: run "
        "python recipes/toy_teacher.py (run.name=demo writes outputs/toy_teacher/demo/teacher)"
    )


def test_latent_recipe_refuses_prompts_and_caption_only_data(hub, checkout, capsys):
    """The 1.3B recipe trains on latents (its own load_data decides, tools/prepare.py asks it): --prompts is one error
    line before any download or encoding, naming the preprocess command for data.path instead; a caption-only data.path
    fails prepare's check with the recipe's own message, where it used to pass as "text only"."""
    captions = checkout / "captions.txt"
    captions.write_text("a cat\n")
    argv = ["--recipe", RECIPE, *TINY, "--hub-dir", str(hub)]
    error = prepare(checkout, capsys, [*argv, "--prompts", str(captions)], expect="--prompts")
    assert "trains on latents" in error and "python tools/preprocess.py" in error and len(error.splitlines()) == 1
    assert not (checkout / "weights").exists() and not (checkout / "datasets").exists()
    writer = LatentParquetWriter(checkout / "datasets" / "mine", rows_per_file=2, text_only=True)
    writer.write("clip0", "a cat", torch.randn(3, TINY_TEXT_DIM))
    writer.close()
    error = prepare(checkout, capsys, [*argv, "data.path=datasets/mine"], expect="error: data.path")
    assert "vae_latent" in error and "text only" not in error
