"""Videos + captions -> FastVideo-compatible latent parquet (docs/METHOD.md §4), or prompts -> text-only parquet.

    # mp4 folder + captions (JSON [{"path", "cap"}], videos2caption.json, or captions.txt with name<TAB>caption)
    python tools/preprocess.py --model data/Wan2.1-T2V-1.3B-Diffusers --videos clips/ --captions clips/captions.txt \
        --out data/my_latents --height 448 --width 832 --num-frames 77 --fps 16 --device cuda
    # data-free DMD: prompts (one per line, or a JSON list of strings) -> text-only parquet, no VAE
    python tools/preprocess.py --model data/Wan2.1-T2V-1.3B-Diffusers --prompts-only prompts.txt --out data/my_prompts
    # also store a negative-prompt embedding for teacher CFG: <out>/negative_prompt.safetensors
    ... --negative-prompt "blurry, low quality"
    # image-to-video data (Wan2.1-I2V-14B, Wan2.2-I2V-A14B): + the first frame's I2V condition (and CLIP tokens when the
    # model folder has image_encoder/), FastVideo's I2V schema
    python tools/preprocess.py --model data/Wan2.1-I2V-14B-480P-Diffusers --i2v --videos clips/ ...

Output: `<out>/combined_parquet_dataset/worker_0/data_chunk_<n>.parquet` (rows_per_file rows each, the last one smaller).
Resumable: ids in `<out>/done_ids.txt` (appended after each flushed file) are skipped on the next run.
Clips shorter than num_frames at the target fps are skipped with a message. Pixels map to [-1, 1]; the VAE posterior
mean is stored un-normalised; the caption embedding keeps only its valid rows. --i2v adds `first_frame_latent` (the
VAE posterior mean of [frame 0, black frames...], un-normalised, as diffusers' WanImageToVideoPipeline encodes its
condition) and, with image_encoder/ + image_processor/ in --model, `clip_feature` (CLIP's penultimate hidden states of
frame 0) (data/parquet.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from data.encode import encode_prompts, load_text_encoder, load_vae, trim_embedding, vae_encode
from data.video import read_clip
from data.writer import LatentParquetWriter

VIDEO_EXTS = (".mp4", ".mov", ".webm", ".mkv", ".avi")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="diffusers Wan pipeline folder (tokenizer/, text_encoder/, vae/)")
    p.add_argument("--out", required=True, help="output dataset folder")
    p.add_argument("--videos", help="folder of clips (default: <captions dir>/videos if present, else the captions dir)")
    p.add_argument("--captions", help="JSON [{'path','cap'}] / videos2caption.json / captions.txt (name<TAB>caption)")
    p.add_argument("--prompts-only", metavar="FILE", help="write the text-only variant from prompts (txt or JSON list)")
    p.add_argument("--negative-prompt", help="also write <out>/negative_prompt.safetensors for this prompt")
    p.add_argument("--height", type=int, help="pixel height (multiple of 16 for Wan2.1, 32 for Wan2.2 5B)")
    p.add_argument("--width", type=int, help="pixel width (multiple of 16 for Wan2.1, 32 for Wan2.2 5B)")
    p.add_argument("--num-frames", type=int, help="frames per clip, ≡ 1 mod 4 (77, 81, 121)")
    p.add_argument("--fps", type=float, help="frames are subsampled from the source to this rate")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--rows-per-file", type=int, default=8)
    p.add_argument("--worker", type=int, default=0,
                   help="writes worker_<w>/; parallel processes need distinct values and disjoint caption files")
    p.add_argument("--i2v", action="store_true", help="image-to-video rows: + first-frame condition latents, + CLIP "
                   "tokens when --model has image_encoder/ (Wan2.1-I2V)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------------
# Inputs.


def validate_video_args(args: argparse.Namespace) -> None:
    """Frame count and resolution against the VAE's compression, read from vae/config.json before any model loads."""
    missing = [f"--{k.replace('_', '-')}" for k in ("height", "width", "num_frames", "fps") if getattr(args, k) is None]
    if missing:
        sys.exit(f"error: {', '.join(missing)} required for video preprocessing")
    vae_config_path = Path(args.model) / "vae" / "config.json"
    if not vae_config_path.is_file():
        sys.exit(f"error: {vae_config_path} not found: --model must be a diffusers pipeline folder")
    vae_cfg = json.loads(vae_config_path.read_text())
    z_dim = vae_cfg.get("z_dim", 16)
    spatial = vae_cfg.get("scale_factor_spatial") or (16 if z_dim == 48 else 8)
    temporal = vae_cfg.get("scale_factor_temporal") or 4
    multiple = spatial * 2  # VAE downsampling × the DiT's 2×2 patch
    if args.num_frames < 1 or (args.num_frames - 1) % temporal:
        sys.exit(f"error: --num-frames {args.num_frames} must be ≡ 1 mod {temporal} (e.g. 77, 81, 121)")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value <= 0 or value % multiple:
            sys.exit(f"error: --{name} {value} must be a positive multiple of {multiple} for this VAE "
                     f"(z_dim {z_dim}, {spatial}× spatial compression, 2×2 DiT patches)")
    if args.fps <= 0:
        sys.exit(f"error: --fps {args.fps} must be positive")


def read_captions(captions: Path, videos: Path) -> list[tuple[str, Path, str]]:
    """(id, video path, caption) for each entry; ids are file basenames without extension and must be unique."""
    entries = []
    if captions.suffix == ".json":
        for i, item in enumerate(json.loads(captions.read_text())):
            if not isinstance(item, dict) or "path" not in item or "cap" not in item:
                sys.exit(f"error: {captions} entry {i} is not an object with 'path' and 'cap': {item!r}")
            cap = item["cap"][0] if isinstance(item["cap"], list) else item["cap"]
            entries.append((item["path"], str(cap)))
    else:
        for n, line in enumerate(captions.read_text().splitlines(), 1):
            if not line.strip():
                continue
            name, tab, cap = line.partition("\t")
            if not tab:
                sys.exit(f"error: {captions} line {n} has no TAB between name and caption: {line!r}")
            entries.append((name.strip(), cap.strip()))
    out, seen = [], {}
    for name, cap in entries:
        path = Path(name) if Path(name).is_absolute() else videos / name
        if not path.suffix:
            path = next((path.with_suffix(e) for e in VIDEO_EXTS if path.with_suffix(e).is_file()), path)
        if not path.is_file():
            sys.exit(f"error: video {path} listed in {captions} does not exist")
        clip_id = path.stem
        if clip_id in seen:
            sys.exit(f"error: duplicate clip id {clip_id!r} ({seen[clip_id]} and {path})")
        seen[clip_id] = path
        out.append((clip_id, path, cap))
    return out


def read_prompts(path: Path) -> list[tuple[str, str]]:
    """(id, prompt) pairs from a txt (one prompt per line, or id<TAB>prompt) or a JSON list of strings/{'id','cap'}."""
    if path.suffix == ".json":
        items = json.loads(path.read_text())
        pairs = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                pairs.append((f"prompt_{i:06d}", item))
            else:
                pairs.append((str(item.get("id", f"prompt_{i:06d}")), str(item.get("cap", item.get("caption", "")))))
        return pairs
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return [(ln.partition("\t")[0], ln.partition("\t")[2]) if "\t" in ln else (f"prompt_{i:06d}", ln.strip())
            for i, ln in enumerate(lines)]


# ---------------------------------------------------------------------------------------------------------------------
# Resume manifest and progress.


def read_done(out: Path) -> set[str]:
    manifest = out / "done_ids.txt"
    return set(manifest.read_text().split("\n")) - {""} if manifest.is_file() else set()


def mark_done(out: Path, ids: list[str]) -> None:
    if ids:
        with open(out / "done_ids.txt", "a") as f:
            f.write("".join(f"{i}\n" for i in ids))


def progress(total: int, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="clip")
    except ImportError:
        return SimpleProgress(total, desc)


class SimpleProgress:
    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.n = total, desc, 0

    def update(self, n: int) -> None:
        self.n += n
        print(f"\r{self.desc}: {self.n}/{self.total}", end="", flush=True)

    def close(self) -> None:
        print()


# ---------------------------------------------------------------------------------------------------------------------


def write_negative_prompt(args: argparse.Namespace, tokenizer, encoder, out: Path) -> None:
    from safetensors.torch import save_file

    context, mask, _ = encode_prompts(tokenizer, encoder, [args.negative_prompt])
    save_file({"text_embedding": trim_embedding(context[0], mask[0]).cpu().contiguous()},
              str(out / "negative_prompt.safetensors"), metadata={"caption": args.negative_prompt})
    print(f"wrote {out / 'negative_prompt.safetensors'}")


def preprocess_prompts(args: argparse.Namespace, out: Path) -> None:
    pairs = read_prompts(Path(args.prompts_only))
    ids = [i for i, _ in pairs]
    if len(set(ids)) != len(ids):
        sys.exit(f"error: duplicate prompt ids in {args.prompts_only}")
    done = read_done(out)
    todo = [(i, p) for i, p in pairs if i not in done]
    print(f"{len(pairs)} prompts, {len(pairs) - len(todo)} already written, {len(todo)} to encode")
    if not todo and not args.negative_prompt:
        return
    tokenizer, encoder = load_text_encoder(args.model, args.device, torch.float32)
    if args.negative_prompt:
        write_negative_prompt(args, tokenizer, encoder, out)
    writer = LatentParquetWriter(out, args.rows_per_file, args.worker, text_only=True)
    bar = progress(len(todo), "prompts")
    for start in range(0, len(todo), args.batch_size):
        chunk = todo[start : start + args.batch_size]
        context, mask, _ = encode_prompts(tokenizer, encoder, [p for _, p in chunk])
        for k, (clip_id, prompt) in enumerate(chunk):
            mark_done(out, writer.write(clip_id, prompt, trim_embedding(context[k], mask[k])))
        bar.update(len(chunk))
    mark_done(out, writer.close())
    bar.close()


def preprocess_videos(args: argparse.Namespace, out: Path) -> None:
    if not args.captions:
        sys.exit("error: --captions is required (or use --prompts-only)")
    captions = Path(args.captions)
    if not captions.is_file():
        sys.exit(f"error: captions file {captions} does not exist")
    videos = Path(args.videos) if args.videos else (
        captions.parent / "videos" if (captions.parent / "videos").is_dir() else captions.parent)
    clips = read_captions(captions, videos)
    done = read_done(out)
    todo = [c for c in clips if c[0] not in done]
    print(f"{len(clips)} clips, {len(clips) - len(todo)} already written, {len(todo)} to encode")
    if not todo and not args.negative_prompt:
        return
    tokenizer, encoder = load_text_encoder(args.model, args.device, torch.float32)
    if args.negative_prompt:
        write_negative_prompt(args, tokenizer, encoder, out)
    if not todo:
        return
    vae = load_vae(args.model, args.device, torch.float32)  # docs/METHOD.md §3.3b: VAE encode in fp32
    image_encoder = None  # (CLIP processor, CLIPVisionModel) for Wan2.1-I2V data
    if args.i2v and (Path(args.model) / "image_encoder").is_dir():
        from inference.pipeline import load_image_encoder

        image_encoder = load_image_encoder(Path(args.model), args.device)
    writer = LatentParquetWriter(out, args.rows_per_file, args.worker, i2v=args.i2v)
    bar, skipped = progress(len(todo), "clips"), []
    for start in range(0, len(todo), args.batch_size):
        batch = []
        for clip_id, path, cap in todo[start : start + args.batch_size]:
            clip = read_clip(path, args.height, args.width, args.num_frames, args.fps)
            if clip is None:
                skipped.append(clip_id)
                print(f"\nskip {path}: shorter than {args.num_frames} frames at {args.fps} fps")
            else:
                batch.append((clip_id, path, cap, *clip))
        if batch:
            pixels = torch.stack([b[3] for b in batch]).to(args.device)  # (B, 3, F, H, W) in [-1, 1]
            latents = vae_encode(vae, pixels)  # (B, C, T, H', W')
            context, mask, _ = encode_prompts(tokenizer, encoder, [b[2] for b in batch])
            i2v = [{} for _ in batch]
            if args.i2v:
                i2v = i2v_features(vae, image_encoder, pixels)
            for k, (clip_id, path, cap, _, src_fps, duration) in enumerate(batch):
                mark_done(out, writer.write(clip_id, cap, trim_embedding(context[k], mask[k]), latents[k],
                                            height=args.height, width=args.width, fps=src_fps,
                                            duration_sec=duration, file_name=path.name, **i2v[k]))
        bar.update(len(todo[start : start + args.batch_size]))
    mark_done(out, writer.close())
    bar.close()
    print(f"done: {len(todo) - len(skipped)} clips written, {len(skipped)} skipped as too short")


def i2v_features(vae: torch.nn.Module, image_encoder: tuple | None,
                 pixels: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Per clip: first_frame_latent (C, T, H', W') = VAE posterior mean of [frame 0, black frames], and clip_feature
    (257, 1280) from frame 0 when a CLIP (processor, encoder) is given."""
    import numpy as np
    from PIL import Image

    from inference.pipeline import clip_image_tokens

    first = pixels[:, :, :1]  # (B, 3, 1, H, W)
    condition = torch.cat([first, torch.zeros_like(pixels[:, :, 1:])], dim=2)
    latents = vae_encode(vae, condition)  # (B, C, T, H', W')
    rows = []
    for k in range(pixels.shape[0]):
        row = {"first_frame_latent": latents[k]}
        if image_encoder is not None:
            frame = ((first[k, :, 0].permute(1, 2, 0).float().cpu() + 1) * 127.5).round().clamp(0, 255)
            image = Image.fromarray(frame.to(torch.uint8).numpy().astype(np.uint8))
            row["clip_feature"] = clip_image_tokens(*image_encoder, image)[0]  # (257, 1280)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.prompts_only:
        validate_video_args(args)
    if args.batch_size < 1 or args.rows_per_file < 1:
        sys.exit("error: --batch-size and --rows-per-file must be >= 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.prompts_only:
        preprocess_prompts(args, out)
    else:
        preprocess_videos(args, out)


if __name__ == "__main__":
    main()
