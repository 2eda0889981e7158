r"""Put everything a recipe's TOML names in place, check it, and print the launch command.

    python tools/prepare.py --recipe wan21_1_3b_sparse_distill      # then run the command it prints
    python tools/prepare.py --recipe wan21_14b_sparse_distill
    python tools/prepare.py --recipe wan22_ti2v_5b_sparse_distill --prompts my_prompts.txt  # data-free: your captions
    python tools/prepare.py --recipe wan22_a14b_t2v_sparse_distill  # two experts: transformer/ + transformer_2/
    python tools/prepare.py --recipe wan22_a14b_i2v_sparse_distill  # I2V: prints the preprocess --i2v command first
    python tools/prepare.py --recipe wan22_a14b_i2v_sparse_distill \
        --toml recipes/wan22_a14b_i2v_sparse_distill.wan21_i2v_14b.toml                  # Wan2.1-I2V-14B, CLIP
    python tools/prepare.py --recipe wan21_1_3b_sparse_distill --toml my.toml run.name=x  # the recipe's own arguments

Reads the recipe's sibling TOML, then `--toml` overlays and `section.key=value` overrides (the arguments the recipe
takes), and for each path the TOML names:
    model.base            reused if present; else the known hub checkpoint of that folder name is downloaded there.
                          Parts: vae/, transformer/ (not with model.preset), transformer_2/ for a two-expert recipe
                          (model_index.json's boundary_ratio must equal model.boundary_ratio), image_encoder/ and
                          image_processor/ for Wan2.1-I2V (model.experts = 1 in an I2V recipe), the text encoder when
                          something is to be encoded
    data.path             reused if present; else the known hub dataset of that name is downloaded there, or, with
                          --prompts FILE (data-free recipes), a text-only parquet of those captions' embeddings.
                          Whether a recipe is data-free, and the check of data.path, are the recipe's own load_data's
                          (tried on one text-only row first: --prompts for a latent recipe fails before any
                          download). An I2V recipe needs video clips: prepare prints the `tools/preprocess.py --i2v`
                          command
    data.negative_prompt  reused if present; else Wan's default negative prompt (English for Wan2.1 and the A14B
                          models, Chinese for Wan2.2-TI2V; --negative-prompt to choose) through the pipeline's UMT5
    data.val_prompts      reused if present; else VALIDATION_PROMPTS (or --val-prompts FILE) -> text-only parquet
    data.val_data         (I2V recipes, instead of val_prompts) I2V rows as data.path: reused, or the preprocess command
Then every path is checked against the model (latent shape from [video], caption-embedding width, VAE channels; I2V
rows: first-frame latents, and CLIP tokens of the model's image_dim for Wan2.1-I2V) and the launch and sampling
commands are printed. A second run reuses everything and only checks. Checkpoints live in weights/, datasets in
datasets/. `--hub-dir DIR` resolves hub ids to DIR/<owner>/<name> (an offline stand-in: see tests/test_newcomer.py,
tests/test_prepare_recipes.py). The toy recipes need no downloads: toy_teacher makes its own data, toy_sparse_distill
needs the toy teacher's export (the script says so).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from components.config import ConfigError, data_folders, load_table
from data.dataset import LatentDataset, check_first_row, load_contexts, load_negative_context
from data.encode import NEGATIVE_PROMPTS, compute_latent_shape, encode_prompts, load_text_encoder, trim_embedding
from data.hub import fetch, is_complete, known_repo
from data.parquet import DataError
from data.writer import LatentParquetWriter
from models.wan import WAN_CONFIGS, WanConfig
from models.wan_weights import read_config, resolve_expert_dirs

ROOT = Path(__file__).resolve().parents[1]
# Validation prompts (ours): varied subjects, motion and camera, so the samples show what the student learned.
VALIDATION_PROMPTS = [
    "A red fox runs through fresh snow in a pine forest, its breath visible in the cold morning air.",
    "A slow dolly shot along a rainy neon-lit city street at night, reflections shimmering on wet asphalt.",
    "Waves crash against black volcanic rocks at sunset, spray glowing orange in the low sun.",
    "A golden retriever puppy chases a soap bubble across a sunlit lawn.",
    "Close-up of hands kneading bread dough on a floured wooden table, warm kitchen light.",
    "An aerial view of a winding river through autumn hills, the camera slowly moving forward.",
    "A hummingbird hovers beside a pink flower, wings blurred, background softly out of focus.",
    "A steam train crosses a stone viaduct in the mountains, white smoke trailing behind it.",
]


I2V_IMAGE = "FIRST_FRAME.png"  # in the printed I2V sample command: the image the user animates


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True, help="recipe name: recipes/<name>.py and its TOML")
    p.add_argument("--toml", action="append", default=[], help="TOML overlay, as for the recipe (repeatable)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides, as for the recipe")
    p.add_argument("--hub-dir", type=Path, help="resolve hub ids to DIR/<owner>/<name> instead of downloading")
    p.add_argument("--prompts", type=Path, help="captions, one per line, for a data-free recipe's data.path")
    p.add_argument("--val-prompts", type=Path, help="validation prompts, one per line (default: built in)")
    p.add_argument("--negative-prompt", help="negative prompt text (default: Wan's, by model family)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="text encoder device")
    return p.parse_intermixed_args(argv)


def recipe_argv(args: argparse.Namespace) -> list[str]:
    """The recipe arguments among ours: overlays and overrides, in their order."""
    return [x for path in args.toml for x in ("--toml", path)] + args.overrides


def recipe_loader(name: str) -> Callable:
    """recipes/<name>.py's own `load_data(path, latent_shape, text_dim)`: what the recipe reads is what prepare checks
    (a copied recipe that changes its data changes prepare's check with it)."""
    spec = importlib.util.spec_from_file_location(f"_recipe_{name}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "load_data", None)):
        raise ConfigError(f"--recipe {name}: recipes/{name}.py has no load_data(path, latent_shape, text_dim), the "
                          "function prepare checks data.path with; keep the Wan recipes' one in a copied recipe")
    return module.load_data


def reads_captions_only(load_data: Callable) -> bool:
    """Whether a recipe trains on captions alone (data-free: its load_data accepts a text-only parquet), asked of
    the recipe's loader on one text-only row in a temporary folder: no model, no encoder."""
    with tempfile.TemporaryDirectory() as folder:
        writer = LatentParquetWriter(Path(folder), rows_per_file=1, text_only=True)
        writer.write("probe", "probe", torch.zeros(1, 8))
        writer.close()
        try:
            load_data(folder, (16, 1, 2, 2), 8)
        except ConfigError:  # a latent recipe: its data.path must hold vae_latent rows
            return False
    return True


# ---------------------------------------------------------------------------------------------------- downloads


# Why a part is needed, where that is not obvious (named in the error when a folder lacks it).
PART_ROLES = {
    "transformer_2": "the low-noise expert of a two-expert teacher",
    "image_encoder": "Wan2.1-I2V's CLIP image encoder",
    "image_processor": "Wan2.1-I2V's CLIP preprocessing",
}


def pipeline_missing(base: Path, parts: list[str]) -> list[str]:
    """The `parts` a pipeline folder lacks: a model part needs config.json and a weight file, tokenizer/ is a folder,
    image_processor/ a preprocessor_config.json."""
    missing = []
    for part in parts:
        folder = base / part
        if part == "tokenizer":
            complete = folder.is_dir()
        elif part == "image_processor":
            complete = (folder / "preprocessor_config.json").is_file()
        else:
            complete = (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))
        if not complete:
            missing.append(f"{part}/" + (f" ({PART_ROLES[part]})" if part in PART_ROLES else ""))
    return missing


def fetch_model(base: Path, parts: list[str], hub_dir: Path | None) -> None:
    """A known checkpoint is downloaded until complete (a rerun resumes it); any other folder must hold `parts`."""
    missing = pipeline_missing(base, parts)
    repo = known_repo(base)
    if not missing and (repo is None or is_complete(base)):
        print(f"model.base: reuse {base}")
        return
    if repo is None:
        raise ConfigError(
            f"model.base: {base} lacks {', '.join(missing)} and its name is no known hub checkpoint; download one with "
            f"python tools/download_hf.py --repo OWNER/NAME --local-dir {base}"
        )
    print(f"model.base: download {repo[0]} -> {base}")
    fetch(*repo, base, hub_dir=hub_dir)  # resumes a partial folder
    missing = pipeline_missing(base, parts)
    if missing:
        raise ConfigError(f"model.base: {base} still lacks {', '.join(missing)} after the download of {repo[0]}")


def fetch_data(
    data_path: str, prompts: Path | None, encode: TextEncoder, hub_dir: Path | None, base: Path, video: dict,
    captions_only: bool,
) -> None:
    for folder in data_folders(data_path):
        repo = known_repo(folder)
        if is_complete(folder) or (repo is None and any(folder.rglob("*.parquet"))):
            print(f"data.path: reuse {folder}")
        elif repo is not None and repo[1] == "dataset":
            print(f"data.path: download {repo[0]} -> {folder}")
            fetch(*repo, folder, hub_dir=hub_dir)
        elif prompts is not None:
            captions = read_lines(prompts, "--prompts")
            print(f"data.path: encode {len(captions)} captions of {prompts} -> {folder} (text only, data-free)")
            write_prompts(folder, captions, encode)
        elif captions_only:
            raise ConfigError(
                f"data.path: {folder} does not exist and its name is no known hub dataset; this recipe trains on "
                "captions alone: give --prompts FILE (captions, one per line)"
            )
        else:
            raise ConfigError(
                f"data.path: {folder} does not exist and its name is no known hub dataset; make its latents "
                + preprocess_fix(base, folder, video, "CLIPS", i2v=False)
            )


def preprocess_fix(base: Path, out: Path, video: dict, clips: str, i2v: bool) -> str:
    """'from your clips (...): python tools/preprocess.py ...': latents of the videos in `clips`/ written to `out` at
    the recipe's video shape (the one line that tells a user how to make a missing dataset)."""
    args = ["--model", str(base), *(["--i2v"] if i2v else []), "--captions", f"{clips}/captions.txt"]
    args += ["--out", str(out), "--height", str(video["height"]), "--width", str(video["width"])]
    args += ["--num-frames", str(video["num_frames"]), "--fps", str(video["fps"])]
    return (
        f"from your clips ({clips}/captions.txt: one name<TAB>caption line per video in {clips}/): "
        + shlex.join(["python", "tools/preprocess.py", *args])
    )


def find_i2v_data(data: dict, base: Path, video: dict, val_count: int) -> None:
    """I2V rows (latents + first-frame latents, and CLIP tokens for Wan2.1-I2V) come only from video clips through
    tools/preprocess.py --i2v: each missing folder is one error line with that command."""
    wanted = [("data.path", folder, "CLIPS", "") for folder in data_folders(data["path"])]
    note = f"validation conditions on its first run.val_count={val_count} rows (a few held-out clips); "
    wanted.append(("data.val_data", Path(data["val_data"]), "VAL_CLIPS", note))
    problems = []
    for key, folder, clips, note in wanted:
        if any(folder.rglob("*.parquet")):
            print(f"{key}: reuse {folder}")
        else:
            state = "holds no parquet file" if folder.exists() else "does not exist"
            fix = preprocess_fix(base, folder, video, clips, i2v=True)
            problems.append(f"{key}: {folder} {state}; {note}I2V rows come only {fix}")
    if problems:
        raise ConfigError("\n".join(problems))


# ---------------------------------------------------------------------------------------------------- encodings


class TextEncoder:
    """The pipeline's UMT5, loaded on first use (nothing to encode: nothing loaded)."""

    def __init__(self, base: Path, text_dim: int, device: str) -> None:
        self.base, self.text_dim, self.device, self.model = base, text_dim, device, None

    def __call__(self, prompts: list[str], batch_size: int = 8) -> list[torch.Tensor]:
        """Each prompt's valid embedding rows (L_i, D), float32 on the CPU."""
        if self.model is None:
            print(f"load the text encoder of {self.base} ({self.device})")
            self.model = load_text_encoder(self.base, self.device, torch.float32)
            width = self.model[1].config.d_model
            if width != self.text_dim:
                raise ConfigError(
                    f"model.base: text encoder width {width} != the transformer's text_dim {self.text_dim}"
                )
        out = []
        for start in range(0, len(prompts), batch_size):
            context, mask, _ = encode_prompts(*self.model, prompts[start : start + batch_size])
            out += [trim_embedding(c, m).cpu() for c, m in zip(context, mask)]
        return out


def read_lines(path: Path, flag: str) -> list[str]:
    if not path.is_file():
        raise ConfigError(f"{flag} {path} is not a file")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"{flag} {path} holds no prompt")
    return lines


def write_prompts(folder: Path, prompts: list[str], encode: TextEncoder) -> None:
    """A text-only parquet of `prompts`, written next to `folder` and renamed into place (never half-written)."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    writer = LatentParquetWriter(tmp, rows_per_file=8, text_only=True)
    for start in range(0, len(prompts), 64):  # batches, so a long caption list never sits in memory as embeddings
        batch = prompts[start : start + 64]
        for i, (prompt, embedding) in enumerate(zip(batch, encode(batch)), start):
            writer.write(f"prompt{i:06d}", prompt, embedding)
    writer.close()
    folder.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, folder)


def write_negative_prompt(path: Path, text: str, encode: TextEncoder) -> None:
    from safetensors.torch import save_file

    if path.suffix != ".safetensors":
        raise ConfigError(f"data.negative_prompt: {path} does not exist; prepare writes .safetensors files only")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"text_embedding": encode([text])[0].contiguous()}, str(tmp), metadata={"caption": text})
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------- checks


def check_boundary(base: Path, model: dict) -> None:
    """A two-expert recipe's base as the recipe will see it, from config files alone (models/wan_weights.py
    resolve_expert_dirs): model_index.json's boundary_ratio (where the teacher switches experts) must equal
    model.boundary_ratio."""
    index = base / "model_index.json"
    try:
        _, _, boundary = resolve_expert_dirs(base)  # boundary in timesteps: boundary_ratio · 1000
    except FileNotFoundError as e:
        raise ConfigError(f"model.base: {e}") from None
    if boundary != model["boundary_ratio"] * 1000:  # the recipe's comparison, in timesteps
        ratio = boundary / 1000
        raise ConfigError(
            f"model.base: {index} sets boundary_ratio {ratio:g} but model.boundary_ratio={model['boundary_ratio']}; "
            f"set model.boundary_ratio={ratio:g}"
        )


def check_data(
    data: dict, latent_shape: tuple[int, ...], text_dim: int, val_count: int, load_data: Callable
) -> list[str]:
    """T2V data: one line per problem (empty: the recipe will accept its data); prints what it found. data.path is
    read by the recipe's own `load_data`."""
    problems = []
    try:
        dataset = load_data(data["path"], latent_shape, text_dim)
        kind = "text only" if dataset.text_only else f"latents {tuple(latent_shape)}"
        print(f"  data.path             {len(dataset)} rows, {kind}, captions {text_dim} wide")
    except ConfigError as e:  # the recipe's message names data.path
        problems.append(str(e))
    except OSError as e:
        problems.append(f"data.path: {e}")
    try:
        contexts = load_contexts(data["val_prompts"], val_count)  # (N, 512, D): the first run.val_count rows
        if contexts.shape[-1] != text_dim:
            problems.append(
                f"data.val_prompts: embedding width {contexts.shape[-1]} != the model's text_dim {text_dim}"
            )
        print(f"  data.val_prompts      {len(contexts)} prompts sampled at validation (run.val_count={val_count})")
    except (DataError, OSError) as e:
        problems.append(f"data.val_prompts: {e}")
    return problems


def check_i2v_data(
    data: dict, latent_shape: tuple[int, ...], text_dim: int, image_dim: int | None, val_count: int
) -> list[str]:
    """I2V data (data.path, data.val_data), as the I2V recipe reads them: latents and first-frame latents of
    `latent_shape`, caption embeddings `text_dim` wide and, for a model with CLIP image tokens (Wan2.1-I2V), a
    clip_feature `image_dim` wide. One line per problem; prints what it found."""
    problems = []
    for key in ("path", "val_data"):
        try:
            dataset = LatentDataset(
                str(data[key]), num_latent_t=latent_shape[1], expect_latent_shape=latent_shape, i2v=True
            )
            check_first_row(dataset, text_dim, image_dim)  # and CLIP tokens of image_dim for Wan2.1-I2V
            clip = dataset[0].get("clip_feature")  # (L_img, D_img): printed below
        except (DataError, OSError) as e:
            hint = " (I2V rows: tools/preprocess.py --i2v)" if "missing columns" in str(e) else ""  # e.g. T2V rows
            problems.append(f"data.{key}: {e}{hint}")
            continue
        tokens = f", CLIP tokens {tuple(clip.shape)}" if image_dim is not None else ""
        if key == "path":
            print(
                f"  data.path             {len(dataset)} rows, I2V latents {tuple(latent_shape)} + first frame"
                f"{tokens}, captions {text_dim} wide"
            )
        else:
            print(
                f"  data.val_data         {min(val_count, len(dataset))} of {len(dataset)} rows conditioned on at "
                f"validation (run.val_count={val_count}){tokens}"
            )
    return problems


def check_negative(path: str, text_dim: int) -> list[str]:
    try:
        width = load_negative_context(path)[0].shape[-1]  # (512, D)
    except (DataError, OSError) as e:
        return [f"data.negative_prompt: {e}"]
    print(f"  data.negative_prompt  {width} wide")
    if width != text_dim:
        return [f"data.negative_prompt: embedding width {width} != the model's text_dim {text_dim}"]
    return []


# ---------------------------------------------------------------------------------------------------- recipes


def prepare_wan(table: dict, args: argparse.Namespace) -> None:
    model, data, video = table["model"], table["data"], table["video"]
    base, preset = Path(model["base"]), model.get("preset")
    val_count = table["run"].get("val_count", 4)
    # An I2V recipe is one whose validation conditions on I2V rows (data.val_data) instead of prompts
    # (data.val_prompts): a key of the recipe's own schema, so every overlay of it is I2V too.
    i2v = "val_data" in data
    # Two experts (Wan2.2-A14B): the A14B recipes name model.boundary_ratio; the I2V recipe also model.experts, which
    # its Wan2.1-I2V-14B overlay sets to 1 (one transformer with CLIP image tokens).
    experts = model.get("experts", 2 if "boundary_ratio" in model else 1)
    if i2v and args.prompts is not None:
        raise ConfigError(
            "--prompts: an I2V recipe trains on video clips (latents and their first frames), not on captions alone; "
            "drop --prompts and prepare prints the tools/preprocess.py --i2v command for data.path"
        )
    load_data = None if i2v else recipe_loader(args.recipe)
    captions_only = not i2v and reads_captions_only(load_data)
    if args.prompts is not None and not i2v and not captions_only:  # before any download or encoding
        folder = Path(data_folders(data["path"])[0])
        repo = known_repo(folder)
        hub = f"prepare downloads {repo[0]} there, or " if repo is not None and repo[1] == "dataset" else ""
        raise ConfigError(
            f"--prompts: recipes/{args.recipe}.py trains on latents of video clips (its load_data reads vae_latent "
            f"rows), not on captions alone; drop --prompts: for data.path {hub}make it "
            + preprocess_fix(base, folder, video, "CLIPS", i2v=False)
        )
    negative = Path(data["negative_prompt"])
    val_prompts = None if i2v else Path(data["val_prompts"])
    data_missing = not all(any(f.rglob("*.parquet")) for f in data_folders(data["path"]))
    needs_encoder = (
        not negative.exists()
        or (val_prompts is not None and not val_prompts.exists())
        or (data_missing and args.prompts is not None)
    )
    transformers = [] if preset else ["transformer", "transformer_2"][:experts]
    clip = ["image_encoder", "image_processor"] if i2v and experts == 1 and not preset else []
    parts = ["vae", *transformers, *clip] + (["text_encoder", "tokenizer"] if needs_encoder else [])
    if model.get("experts") == 1 and not preset and (base / "transformer_2").exists():
        raise ConfigError(
            f"model.base: {base} has transformer_2/ (a two-expert Wan2.2-A14B folder) but model.experts=1; set "
            "model.experts=2 and model.boundary_ratio, or give a one-transformer folder (Wan2.1-I2V-14B)"
        )
    fetch_model(base, parts, args.hub_dir)
    if experts == 2 and not preset:
        check_boundary(base, model)

    if preset is not None and preset not in WAN_CONFIGS:
        raise ConfigError(f"model.preset={preset!r}; choose one of {sorted(WAN_CONFIGS)}")
    wan = WAN_CONFIGS[preset] if preset else WanConfig.from_diffusers(read_config(base))
    z_dim = int(json.loads((base / "vae" / "config.json").read_text()).get("z_dim", 16))
    encode = TextEncoder(base, wan.text_dim, args.device)
    if not i2v:
        fetch_data(data["path"], args.prompts, encode, args.hub_dir, base, video, captions_only)
    if negative.exists():
        print(f"data.negative_prompt: reuse {negative}")
    else:
        # Wan's default negative prompt: Chinese for Wan2.2-TI2V (its own VAE, z_dim 48); English for Wan2.1 and
        # the A14B models (z_dim 16), the one tools/sample.py and VideoPipeline use for them.
        text = args.negative_prompt or NEGATIVE_PROMPTS["zh" if z_dim == 48 else "en"]
        print(f"data.negative_prompt: encode {text[:40]!r}... -> {negative}")
        write_negative_prompt(negative, text, encode)
    if i2v:  # after the negative prompt: a rerun once the clips are encoded finds everything else in place
        find_i2v_data(data, base, video, val_count)
    elif val_prompts.exists():
        print(f"data.val_prompts: reuse {val_prompts}")
    else:
        prompts = read_lines(args.val_prompts, "--val-prompts") if args.val_prompts else VALIDATION_PROMPTS
        print(f"data.val_prompts: encode {len(prompts)} prompts -> {val_prompts}")
        write_prompts(val_prompts, prompts, encode)

    print("check:")
    try:  # the denoised latents: out_channels (an I2V model's input adds a mask and the image latent)
        latent_shape = compute_latent_shape(
            wan.out_channels, video["num_frames"], video["height"], video["width"], video["vae_stride"]
        )
    except ValueError as e:
        raise ConfigError(f"video: {e}") from None
    problems = (
        [] if z_dim == wan.out_channels else [f"model.base: VAE z_dim {z_dim} != DiT out_channels {wan.out_channels}"]
    )
    expected_in = 2 * wan.out_channels + 4 if i2v else wan.out_channels  # I2V: [x, first-frame mask (4), image]
    if wan.in_channels != expected_in:
        kind = "an I2V recipe needs an I2V model" if i2v else "a T2V recipe needs a T2V model"
        key = "model.preset" if preset else "model.base"
        problems.append(f"{key}: DiT in_channels={wan.in_channels} != {expected_in}: {kind}")
    print(f"  model.base            {'preset ' + preset if preset else 'DiT'} {wan.dim} wide, VAE z_dim {z_dim}"
          + (f", {experts} experts" if experts == 2 and not preset else ""))
    if i2v:
        problems += check_i2v_data(data, latent_shape, wan.text_dim, wan.image_dim, val_count)
    else:
        problems += check_data(data, latent_shape, wan.text_dim, val_count, load_data)
    problems += check_negative(data["negative_prompt"], wan.text_dim)
    if problems:
        raise ConfigError("\n".join(problems))


def launch_commands(name: str, table: dict, argv: list[str]) -> list[tuple[str, str]]:
    """(what, command) to train: one process for a 1-GPU mesh, else the TOML's multi-node launch and one node's."""
    script = f"recipes/{name}.py"
    parallel = table.get("parallel", {})
    dp_replicate, sp = parallel.get("dp_replicate", 1), parallel.get("sp", 1)
    if dp_replicate * sp == 1:
        return [("train", shlex.join(["python", script, *argv]))]
    commands = []
    sbatch = ROOT / "recipes" / "slurm" / f"{name}.sbatch"
    if sbatch.is_file():
        nodes = next(int(x.split("=")[1]) for x in sbatch.read_text().split() if x.startswith("--nodes="))
        commands.append(
            (
                f"train on {nodes} nodes x 8 GPUs (the TOML's mesh)",
                "mkdir -p outputs/slurm && " + shlex.join(["sbatch", str(sbatch.relative_to(ROOT)), *argv]),
            )
        )
        # A TOML that replicates over every GPU of the cluster replicates over one node's too; others shard in it.
        one_node = 8 // sp if dp_replicate * sp == 8 * nodes else 1
    else:
        one_node = 1
    one_node_argv = [a for a in argv if not a.startswith("parallel.dp_replicate=")]
    one_node_argv.append(f"parallel.dp_replicate={one_node}")
    commands.append(
        ("train on one 8-GPU node", shlex.join(["torchrun", "--nproc_per_node", "8", script, *one_node_argv]))
    )
    return commands


def sample_command(name: str, table: dict) -> str:
    """tools/sample.py on the run's exported student, at the size and schedule it was trained for; an I2V student
    animates a first frame (`--image`: FIRST_FRAME.png stands for the user's image)."""
    run, video, dmd, attn = table["run"], table["video"], table["dmd"], table["attn"]
    export = Path(run.get("out_dir", "outputs")) / name / run["name"] / "export"
    dtype = "fp32" if table["parallel"].get("mixed_precision") == "fp32" else "bf16"
    steps = ",".join(map(str, dmd["steps"]))
    args = ["--model", str(export), "--prompt", VALIDATION_PROMPTS[0], "--num-frames", str(video["num_frames"])]
    args += ["--height", str(video["height"]), "--width", str(video["width"]), "--steps", steps]
    args += ["--attn", attn["student"], "--sparsity", str(attn["sparsity"]), "--dtype", dtype]
    if "val_data" in table["data"]:  # an I2V recipe (the rule of prepare_wan)
        args += ["--image", I2V_IMAGE]
    return shlex.join(["python", "tools/sample.py", *args])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    recipe = ROOT / "recipes" / f"{args.recipe}.py"
    if not recipe.is_file():
        names = sorted(p.stem for p in (ROOT / "recipes").glob("*.py"))
        raise ConfigError(f"--recipe {args.recipe!r}: no recipes/{args.recipe}.py; choose one of {names}")
    rargv = recipe_argv(args)
    table = load_table(rargv, recipe.with_suffix(".toml"))
    model = table.get("model", {})
    if "base" in model:
        prepare_wan(table, args)
    elif "teacher" in model:  # the toy sparse-distill: its teacher is the toy teacher recipe's export
        teacher = Path(model["teacher"])
        if not (teacher / "config.json").is_file():
            raise ConfigError(
                f"model.teacher: {teacher} does not exist; it is the toy teacher's export: run "
                "python recipes/toy_teacher.py (run.name=demo writes outputs/toy_teacher/demo/teacher)"
            )
        print(f"model.teacher: reuse {teacher}")
    else:
        print(f"{args.recipe}: nothing to download; its data are synthetic (data/synthetic.py)")
    print("ready:")
    for what, command in launch_commands(args.recipe, table, rargv):
        print(f"  {what}:\n    {command}")
    if "base" in model:
        image = f" ({I2V_IMAGE}: your first frame, of the video's aspect ratio)" if "val_data" in table["data"] else ""
        print(f"  sample from the student{image}:\n    {sample_command(args.recipe, table)}")


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, ConnectionError) as e:
        sys.exit("\n".join(f"error: {line}" for line in str(e).splitlines()))
