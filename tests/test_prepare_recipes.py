"""tools/prepare.py for the two-expert and image-to-video recipes, offline: a local tiny "hub" stands in for the
Hugging Face downloads (as tests/test_newcomer.py does for the 1.3B recipe).

The stand-in checkpoints are the tiny folders the recipe and sampling tests already write: Wan2.2-T2V-A14B and
Wan2.1-I2V-14B (with CLIP image_encoder/ and image_processor/) by diffusers' own pipeline `save_pretrained`
(tests/test_i2v_pipeline.py), Wan2.2-I2V-A14B with boundary_ratio 0.9 (tests/test_a14b_recipes.py). Prepare runs with
the tiny CPU overlay and `model.preset=none` (the folder's experts), as the A14B recipe tests run the recipes. Checks:
the two-expert checkpoint is fetched with transformer_2/, a second run reuses every file untouched, and the printed
train command's arguments pass the recipe's own check_config and data loading (an independent judge of what prepare
wrote and printed); a one-expert folder or a boundary_ratio that disagrees with the TOML is one error line naming
model.base before anything is encoded; an I2V recipe without data is one line per missing key with a
tools/preprocess.py --i2v command that the tool's own argument parser and size check accept; with tiny I2V rows the
check passes (Wan2.1-I2V: CLIP tokens of the model's image_dim, or one error line per data key without them); the
sample command carries --image.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest
import torch

from components.config import load_config
from data.dataset import load_contexts, load_negative_context
from data.writer import LatentParquetWriter
from tests.recipe_shims import load_recipe
from tests.test_a14b_recipes import i2v_folder
from tests.test_i2v_pipeline import CLIP_DIM, write_pipeline
from tests.test_newcomer import LATENT_SHAPE, TINY, prepare, printed_commands
from tests.tiny_pipeline import TINY_TEXT_DIM

ROOT = Path(__file__).resolve().parents[1]
T2V = "wan22_a14b_t2v_sparse_distill"
I2V = "wan22_a14b_i2v_sparse_distill"
WAN21 = ["--toml", f"recipes/{I2V}.wan21_i2v_14b.toml"]
EXPERTS = ["model.preset=none"]  # the base folder's transformers, not the tiny overlay's random preset


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    """Wan-AI/<name> folders: the three checkpoints the new recipes download."""
    owner = tmp_path_factory.mktemp("hub") / "Wan-AI"
    write_pipeline(owner / "Wan2.2-T2V-A14B-Diffusers", experts=2, i2v=False, clip=False)  # boundary_ratio 0.875
    i2v_folder(owner / "Wan2.2-I2V-A14B-Diffusers", experts=2, clip=False)  # boundary_ratio 0.9
    write_pipeline(owner / "Wan2.1-I2V-14B-480P-Diffusers", experts=1, i2v=True, clip=True)
    return owner.parent


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A fresh working directory with recipes/, tools/ and tests/ of this repository (tests/test_newcomer.py's)."""
    for name in ("recipes", "tools", "tests"):
        (tmp_path / name).symlink_to(ROOT / name)
    return tmp_path


def write_rows(folder: Path, i2v: bool, clip: tuple[int, int] | None = None, rows: int = 4) -> None:
    """Tiny latent rows (what tools/preprocess.py writes) of the tiny overlay's latent shape, 32-wide captions; I2V:
    + first-frame latents and, with `clip`, CLIP tokens (L, D)."""
    gen = torch.Generator().manual_seed(0)
    writer = LatentParquetWriter(folder, rows_per_file=2, i2v=i2v)
    for i in range(rows):
        text, latents = torch.randn(3 + i, TINY_TEXT_DIM, generator=gen), torch.randn(LATENT_SHAPE, generator=gen)
        extra = {}
        if i2v:
            extra["first_frame_latent"] = torch.randn(LATENT_SHAPE, generator=gen)
            extra["clip_feature"] = torch.randn(clip, generator=gen) if clip else None
        writer.write(f"clip{i}", f"caption {i}", text, latents, height=64, width=128, fps=8.0, **extra)
    writer.close()


def snapshot(checkout: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in [*(checkout / "weights").rglob("*"), *(checkout / "datasets").rglob("*")]}


def check_with_recipe(name: str, recipe_argv: list[str], checkout: Path, monkeypatch) -> None:
    """The recipe's own checks on the printed train command's arguments: its config check (paths, experts, boundary,
    I2V channels) and reading the first row of each dataset as it does before building a model."""
    module = load_recipe(ROOT / "recipes" / f"{name}.py")
    monkeypatch.chdir(checkout)
    cfg = load_config(module.RecipeConfig, recipe_argv, default_toml=ROOT / "recipes" / f"{name}.toml")
    wan, latent_shape = module.check_config(cfg, 1)
    assert tuple(latent_shape) == LATENT_SHAPE
    if name == I2V:
        for path in (cfg.data.path, str(cfg.data.val_data)):
            module.load_data(path, latent_shape, wan)
    else:
        module.load_data(cfg.data.path, latent_shape, wan.text_dim)
        assert load_contexts(cfg.data.val_prompts, cfg.run.val_count).shape[-1] == wan.text_dim
    assert load_negative_context(cfg.data.negative_prompt)[0].shape[-1] == wan.text_dim


def sample_args(command: list[str]):
    from tools.sample import parse_args

    assert command[:2] == ["python", "tools/sample.py"]
    return parse_args(command[2:])


def test_t2v_a14b_fetches_both_experts_and_reuses_them(hub, checkout, capsys, monkeypatch):
    write_rows(checkout / "datasets" / "Wan2.2-A14B_81x480x832", i2v=False)  # as tools/preprocess.py would
    argv = ["--recipe", T2V, *TINY, *EXPERTS, "--hub-dir", str(hub)]
    out = prepare(checkout, capsys, argv)
    pipe = checkout / "weights" / "Wan2.2-T2V-A14B-Diffusers"
    assert (pipe / "transformer" / "config.json").is_file() and (pipe / "transformer_2" / "config.json").is_file()
    assert "2 experts" in out and f"4 rows, latents {LATENT_SHAPE}" in out
    train, sample = printed_commands(out)
    assert train == ["python", f"recipes/{T2V}.py", *TINY, *EXPERTS]
    args = sample_args(sample)
    assert args.model == f"outputs/{T2V}/tiny/export" and args.steps == "1000,757,522"
    assert (args.sparsity, args.dtype, args.image) == (0.9, "fp32", None)

    files = snapshot(checkout)
    again = prepare(checkout, capsys, argv)
    assert again.count(": reuse ") == 4 and "encode" not in again and "download" not in again
    assert snapshot(checkout) == files
    check_with_recipe(T2V, train[2:], checkout, monkeypatch)


@pytest.mark.parametrize("case", ["hub_one_expert", "local_one_expert", "boundary"])
def test_two_expert_base_mismatch_is_one_line(case, hub, checkout, capsys, tmp_path_factory):
    argv = ["--recipe", T2V, *TINY, *EXPERTS]
    name = "weights/Wan2.2-T2V-A14B-Diffusers"
    lacks = "lacks transformer_2/ (the low-noise expert of a two-expert teacher)"
    if case == "boundary":
        argv += ["--hub-dir", str(hub), "model.boundary_ratio=0.9"]
        expected = (f"error: model.base: {name}/model_index.json sets boundary_ratio 0.875 but "
                    "model.boundary_ratio=0.9; set model.boundary_ratio=0.875")
    else:
        hub_one = tmp_path_factory.mktemp("one")
        if case == "hub_one_expert":
            write_pipeline(hub_one / "Wan-AI" / "Wan2.2-T2V-A14B-Diffusers", experts=1, i2v=False, clip=False)
            argv += ["--hub-dir", str(hub_one)]
            expected = f"error: model.base: {name} still {lacks} after the download of Wan-AI/Wan2.2-T2V-A14B-Diffusers"
        else:  # a local folder whose name is no hub checkpoint
            local = write_pipeline(hub_one / "my-wan", experts=1, i2v=False, clip=False)
            argv += [f"model.base={local}"]
            expected = (f"error: model.base: {local} {lacks} and its name is no known hub checkpoint; download "
                        f"one with python tools/download_hf.py --repo OWNER/NAME --local-dir {local}")
    assert prepare(checkout, capsys, argv, expect="model.base") == expected
    assert not (checkout / "datasets").exists()  # nothing encoded before the check


def test_i2v_without_data_names_the_preprocess_command(hub, checkout, capsys, monkeypatch):
    from tools.preprocess import parse_args, validate_video_args

    argv = ["--recipe", I2V, *TINY, *EXPERTS, "--hub-dir", str(hub)]
    error = prepare(checkout, capsys, [*argv, "--prompts", "captions.txt"], expect="--prompts")
    assert len(error.splitlines()) == 1 and not (checkout / "weights").exists()

    error = prepare(checkout, capsys, argv, expect="data.path")
    folder = "datasets/Wan2.2-I2V-A14B_81x480x832"
    folders = {"data.path": folder, "data.val_data": f"{folder}_val"}
    lines = error.splitlines()
    assert len(lines) == 2
    monkeypatch.chdir(checkout)
    for line, (key, folder) in zip(lines, folders.items()):
        assert line.startswith(f"error: {key}: {folder} does not exist; ")
        command = shlex.split(line[line.index("python tools/preprocess.py") :])
        args = parse_args(command[2:])
        assert args.i2v and (args.model, args.out) == ("weights/Wan2.2-I2V-A14B-Diffusers", folder)
        assert (args.num_frames, args.height, args.width, args.fps) == (17, 64, 128, 8.0)  # the tiny overlay's video
        validate_video_args(args)  # preprocess accepts this shape for the fetched model's VAE
    # What could be done was done: the model is in place and the negative prompt encoded.
    assert (checkout / "weights" / "Wan2.2-I2V-A14B-Diffusers" / "transformer_2" / "config.json").is_file()
    assert (checkout / "datasets" / "Wan2.2-I2V-A14B-prompts" / "negative_prompt.safetensors").is_file()


@pytest.mark.parametrize("variant", ["a14b", "wan21", "wan21_without_clip"])
def test_i2v_with_tiny_data_passes_the_check(variant, hub, checkout, capsys, monkeypatch):
    wan21 = variant.startswith("wan21")
    overlay, stem = (WAN21, "Wan2.1-I2V-14B") if wan21 else ([], "Wan2.2-I2V-A14B")
    folders = [checkout / "datasets" / f"{stem}_81x480x832{suffix}" for suffix in ("", "_val")]
    for folder in folders:
        write_rows(folder, i2v=True, clip=(5, CLIP_DIM) if variant == "wan21" else None)
    argv = ["--recipe", I2V, *overlay, *TINY, *EXPERTS, "--hub-dir", str(hub)]
    if variant == "wan21_without_clip":
        error = prepare(checkout, capsys, argv, expect="clip_feature")
        assert [line.split(":")[1].strip() for line in error.splitlines()] == ["data.path", "data.val_data"]
        assert f"has no clip_feature; this model takes CLIP tokens of width {CLIP_DIM}" in error
        return
    out = prepare(checkout, capsys, argv)
    assert f"4 rows, I2V latents {LATENT_SHAPE} + first frame" in out
    assert ("CLIP tokens (5, 16)" in out) == wan21
    pipe = checkout / "weights" / f"{stem}-480P-Diffusers" if wan21 else checkout / "weights" / f"{stem}-Diffusers"
    assert (pipe / "image_encoder" / "config.json").is_file() == wan21
    assert (pipe / "transformer_2").is_dir() != wan21
    train, sample = printed_commands(out)
    assert train == ["python", f"recipes/{I2V}.py", *overlay, *TINY, *EXPERTS]
    assert sample_args(sample).image == "FIRST_FRAME.png"

    files = snapshot(checkout)
    again = prepare(checkout, capsys, argv)
    assert again.count(": reuse ") == 4 and "encode" not in again and "download" not in again
    assert snapshot(checkout) == files
    check_with_recipe(I2V, train[2:], checkout, monkeypatch)


def test_wan21_overlay_refuses_a_two_expert_folder(hub, checkout, capsys):
    os.symlink(hub / "Wan-AI" / "Wan2.2-I2V-A14B-Diffusers", checkout / "two")
    argv = ["--recipe", I2V, *WAN21, *TINY, *EXPERTS, "--hub-dir", str(hub), "model.base=two"]
    error = prepare(checkout, capsys, argv, expect="model.base")
    assert error.startswith("error: model.base: two has transformer_2/ (a two-expert Wan2.2-A14B folder) but "
                            "model.experts=1") and len(error.splitlines()) == 1
