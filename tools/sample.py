r"""Sample videos from a Wan checkpoint: few-step DMD with VSA (the distilled student), or the many-step CFG teacher.

    # FastWan 1.3B, 3 steps, VSA at 80% sparsity, 81x480x832 -> outputs/samples/00_a_cat_....mp4
    python tools/sample.py --model FastVideo/FastWan2.1-T2V-1.3B-Diffusers --prompt "a cat walks on the grass" --compile
    # the same prompt through the dense 50-step CFG teacher, for a side-by-side comparison
    python tools/sample.py --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --prompt "a cat walks on the grass" --teacher \
        --guidance 3 --shift 3
    # Wan2.2 TI2V-5B: text-to-video, or image-to-video with --image (dense attention by default for the 5B)
    python tools/sample.py --model FastVideo/FastWan2.2-TI2V-5B-FullAttn-Diffusers --prompts prompts.txt \
        --image cat.png
    # Wan2.2-A14B, two experts (transformer/ for t >= 875, transformer_2/ below), 40-step CFG teacher as published
    python tools/sample.py --model Wan-AI/Wan2.2-T2V-A14B-Diffusers --prompt "a cat" --teacher --teacher-steps 40 \
        --guidance 4 --guidance-2 3 --shift 12
    # image-to-video: Wan2.1-I2V-14B (CLIP + VAE conditioning) or Wan2.2-I2V-A14B (VAE conditioning, two experts)
    python tools/sample.py --model Wan-AI/Wan2.2-I2V-A14B-Diffusers --prompt "a cat" --image cat.png --teacher \
        --teacher-steps 40 --guidance 3.5
    # FP8 (e4m3) linear layers in the DiT blocks and, on Hopper, FP8 sparse attention: faster, slightly different
    # numerics
    python tools/sample.py --model FastVideo/FastWan2.1-T2V-1.3B-Diffusers --prompt "a cat walks on the grass" --fp8 \
        --compile
    # one video over 4 GPUs (Ulysses sequence parallel; inference/parallel.py); rank 0 writes the files
    torchrun --nproc_per_node 4 tools/sample.py --model FastVideo/FastWan2.1-T2V-1.3B-Diffusers --prompt "a cat" --fp8
    # the teacher on 4 GPUs: the conditional and unconditional forwards on 2 GPUs each
    torchrun --nproc_per_node 4 tools/sample.py --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --prompt "a cat" --teacher \
        --cfg-parallel
    # a base model plus a LoRA adapter from a LoRA Sparse-distill run (inference/lora.py), at 0.8 of its strength
    python tools/sample.py --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --lora outputs/RUN/export_lora:0.8 --prompt "a cat"
    # tiny CPU run (tests/test_sample.py)
    python tools/sample.py --model PIPE_DIR --prompt "a red car" --num-frames 9 --height 32 --width 32 \
        --device cpu --dtype fp32

A command line over `inference.VideoPipeline` (the same in Python: `VideoPipeline.from_pretrained(...)`, then
`pipe(prompt, ...)`). --model is a diffusers pipeline folder (transformer/, vae/, text_encoder/, tokenizer/) or a hub
id; hub ids download only those subfolders (configs first, so bad input fails before any weights move). The prompts
are encoded first and the text encoder freed before the DiT loads. Samplers: inference/samplers.py. Prints a timing
table per video (CUDA events on GPU; the denoise loop has no host syncs).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from components.metrics import write_video
from inference.fp8 import Float8Linear
from inference.parallel import broadcast_from_first, check_same_request, check_sampling_sizes, check_token_grid
from inference.pipeline import (
    ATTN,
    NEGATIVE_PROMPT,
    InputError,
    VideoPipeline,
    check_device,
    check_pipeline_lora,
    encode_text,
    inspect_pipeline,
    lora_base,
)
from inference.timer import StageTimer, timing_table
from parallel.mesh import init_distributed

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="diffusers Wan pipeline folder or hub id (owner/name)")
    p.add_argument("--prompt", help="one prompt")
    p.add_argument("--prompts", metavar="FILE", help="prompts, one per line (blank lines skipped)")
    p.add_argument("--negative-prompt", default=NEGATIVE_PROMPT, help="teacher CFG's unconditional prompt")
    p.add_argument("--height", type=int, help="pixels; multiple of VAE ratio x patch (16 Wan2.1, 32 TI2V-5B)")
    p.add_argument("--width", type=int, help="pixels; multiple of VAE ratio x patch (16 Wan2.1, 32 TI2V-5B)")
    p.add_argument("--num-frames", type=int, help="video frames, = 1 mod 4 (81, 121)")
    p.add_argument("--fps", type=int, help="mp4 frame rate (default: 16 Wan2.1, 24 TI2V-5B)")
    p.add_argument("--seed", type=int, default=1024, help="noise seed (the same for every prompt)")
    p.add_argument("--steps", default="1000,757,522", help="student DMD timesteps, decreasing, in (0, 1000]")
    p.add_argument("--attn", choices=sorted(ATTN), help="student attention (default: vsa; sdpa for TI2V-5B)")
    p.add_argument("--sparsity", type=float, default=0.8, help="VSA sparsity in [0, 1) (0.9 for the 14B)")
    p.add_argument("--teacher", action="store_true", help="many-step CFG flow sampling with dense attention instead")
    p.add_argument("--teacher-steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=5.0, help="teacher CFG scale (two experts: the high-noise one's)")
    p.add_argument("--guidance-2", type=float, help="two-expert teacher (Wan2.2-A14B): the low-noise expert's CFG "
                   "scale (default: --guidance)")
    p.add_argument("--shift", type=float, default=5.0, help="teacher flow shift")
    p.add_argument("--lora", metavar="DIR[:SCALE]", help="merge a LoRA adapter folder (export_lora) into the base "
                   "model, at SCALE (default 1: as trained)")
    p.add_argument("--image", metavar="PATH", help="image-to-video: the first frame (TI2V-5B, Wan2.1-I2V, "
                   "Wan2.2-I2V-A14B; required by I2V checkpoints); resized to the video size, which must have the "
                   "image's aspect ratio")
    p.add_argument("--out", default="outputs/samples", help="output folder")
    p.add_argument("--save-latents", action="store_true", help="also write the final normalised latents (.pt)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="DiT and VAE-decode precision")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT")
    p.add_argument("--fp8", action="store_true", help="FP8 (e4m3, row-wise scaled) linear layers in the DiT blocks "
                   "(inference/fp8.py; GPU with FP8 tensor cores, sm89+) and, on sm90+, the student's VSA on e4m3 q, "
                   "k, v (vsa_fp8_attention); changes numerics slightly")
    p.add_argument("--vae-compile", action="store_true", help="torch.compile the VAE decoder")
    p.add_argument("--vae-channels-last", action="store_true", help="channels-last conv weights for the VAE decode")
    p.add_argument("--cfg-parallel", action="store_true", help="under torchrun, with --teacher: the CFG branches on "
                   "two halves of the ranks (each half runs sequence parallel); default: all ranks run both")
    return p.parse_args(argv)


def read_prompts(prompt: str | None, prompts_file: str | None) -> list[str]:
    if prompt is not None and prompts_file is not None:
        raise InputError("give --prompt or --prompts FILE, not both")
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise InputError(f"--prompts {prompts_file!r} is not a file")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise InputError(f"--prompts {prompts_file!r} has no prompts (one per line expected)")
        return prompts
    if prompt is None or not prompt.strip():
        raise InputError("empty prompt: pass --prompt TEXT or --prompts FILE")
    return [prompt.strip()]


def parse_steps(text: str) -> list[float]:
    try:
        return [float(s) for s in text.split(",")]
    except ValueError:
        raise InputError(f"--steps {text!r} must be comma-separated numbers, e.g. 1000,757,522") from None


def parse_lora(text: str | None) -> tuple[Path | None, float]:
    """--lora DIR[:SCALE] -> (DIR, SCALE); a DIR that exists as given wins (a folder name may contain ':')."""
    if text is None:
        return None, 1.0
    path, sep, scale = text.rpartition(":")
    if not sep or Path(text).is_dir():
        return Path(text), 1.0
    try:
        return Path(path), float(scale)
    except ValueError:
        raise InputError(f"--lora {text!r}: scale {scale!r} is not a number (DIR[:SCALE], e.g. "
                         "outputs/RUN/export_lora:0.8)") from None


def slug(text: str, max_len: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:max_len] or "prompt"


def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    own_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()  # under torchrun
    if own_group:
        _, _, local_device = init_distributed()
        device = local_device if device.type == "cuda" else device  # cuda:LOCAL_RANK
    world = dist.get_world_size() if dist.is_initialized() else 1
    writer = world == 1 or dist.get_rank() == 0
    sp = world // (2 if args.cfg_parallel else 1)
    try:  # every input against the config files, before any weights load
        prompts, steps = read_prompts(args.prompt, args.prompts), parse_steps(args.steps)
        check_same_request({**vars(args), "prompts": prompts})  # every rank: the same arguments and prompts
        check_device(device, dtype, args.fp8)
        if args.cfg_parallel and not args.teacher:
            raise InputError("--cfg-parallel splits the teacher's CFG branches; the student has none (add --teacher)")
        files = inspect_pipeline(args.model)
        size = files.spec.size(args.height, args.width, args.num_frames)
        files.spec.check_sampling(steps, args.sparsity, args.teacher, args.teacher_steps, args.image, size)
        if args.guidance_2 is not None and files.spec.experts < 2:
            raise InputError("--guidance-2 is the low-noise expert's CFG scale; this model has one transformer")
        check_sampling_sizes(sp, args.cfg_parallel, files.num_heads, world)
        _, nt, nh, nw = size.latent_shape[1:]
        check_token_grid((nt, nh // files.spec.patch[0], nw // files.spec.patch[1]), sp)
        lora, lora_scale = parse_lora(args.lora)
        lora_files = None if lora is None else check_pipeline_lora(files, lora, lora_scale)
        model_dir = files.download()
        if lora_files is not None:  # the base's small tensors (a few MB), before the text encoder runs
            lora_base(model_dir, files.spec.experts, lora_files)
    except ValueError as e:  # InputError and the parallel checks' errors
        sys.exit(f"sample.py: error: {e}")
    load = {}

    # Text first, then free the encoder: UMT5-XXL in fp32 is ~23 GB, more than the 1.3B DiT.
    t0 = time.perf_counter()
    timer_text = StageTimer(device)
    context = None
    if writer:  # rank 0 alone encodes (UMT5-XXL is 23 GB in fp32) while the others load the DiT; broadcast below
        context = encode_text(model_dir, prompts + ([args.negative_prompt] if args.teacher else []), device, timer_text)
    load["text encoder load + encode + free"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    pipe = VideoPipeline.from_pretrained(model_dir, device=device, dtype=dtype, attn=args.attn, fp8=args.fp8,
                                         compile=args.compile, text_encoder=False,
                                         vae_channels_last=args.vae_channels_last, vae_compile=args.vae_compile,
                                         sp=sp, cfg_parallel=args.cfg_parallel, lora=lora, lora_scale=lora_scale)
    context = broadcast_from_first(context, pipe.groups, device)
    load["DiT + VAE load"] = time.perf_counter() - t0
    attn = "sdpa" if args.teacher else pipe.attn
    fp8_layers = sum(isinstance(m, Float8Linear) for m in pipe.dit.modules())
    if writer:
        parallel = f", sp {sp}{' x 2 CFG branches' if args.cfg_parallel else ''}" if world > 1 else ""
        print(f"model {args.model}: {attn} attention{f' (sparsity {args.sparsity})' if attn != 'sdpa' else ''}, "
              f"{size.num_frames}x{size.height}x{size.width} -> latents {size.latent_shape}, {args.dtype}"
              f"{f', fp8 linears ({fp8_layers} layers)' if args.fp8 else ''}, {device}{parallel}"
              f"{f', two experts (switch at t = {files.spec.boundary:g})' if pipe.dit_2 is not None else ''}")
        if lora_files is not None:
            print(f"lora {lora} at scale {lora_scale:g}: {lora_files.describe()}, merged into the base")
        for name, s in load.items():
            print(f"{name}: {s:.1f} s")

    written = []
    for i, prompt in enumerate(prompts):
        timer = StageTimer(device)
        latents = pipe.denoise(context[i : i + 1], negative_context=context[-1:] if args.teacher else None,
                               height=size.height, width=size.width, num_frames=size.num_frames, seed=args.seed,
                               steps=steps, sparsity=args.sparsity, teacher=args.teacher,
                               teacher_steps=args.teacher_steps, guidance=args.guidance, shift=args.shift,
                               image=args.image, guidance_2=args.guidance_2, timer=timer)
        frames = pipe.decode(latents, timer)
        if not writer:  # the other ranks hold the same latents; rank 0 decoded them and writes
            continue
        path = Path(args.out) / f"{i:02d}_{slug(prompt)}{'_teacher' if args.teacher else ''}.mp4"
        write_video(path, frames.numpy(), args.fps or pipe.fps)
        if args.save_latents:
            torch.save(latents.cpu(), path.with_suffix(".latents.pt"))
        written.append(path)
        seconds = timer.seconds()
        if i == 0:
            seconds = {**timer_text.seconds(), **seconds}
        note = " (includes torch.compile warm-up)" if i == 0 and (args.compile or args.vae_compile) else ""
        print(timing_table(seconds, size.num_frames, f"{path}{note}"))
    if own_group:
        dist.destroy_process_group()
    return written


if __name__ == "__main__":
    main()
