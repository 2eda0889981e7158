"""Can the tiny toy teacher learn a caption factor? Train it on one variant of the toy data and print, at step
milestones, per-factor accuracy of its 50-step CFG samples, distance to held-out data and motion coherence.

    python scripts/probe_toy_factors.py --factor direction --steps 24000 --budget-s 450 [--set travel=6 jitter=8 ...]
    python scripts/probe_toy_factors.py --factor brightness                      # the toy's current second factor
    OUT=/tmp/probe bash scripts/probe_toy_motion_gpu.sh        # issue 25: teacher sizes vs motion, one GPU

`--factor brightness` is `data/synthetic.py` as it is (colour × brightness × size; random direction of motion).
`--factor direction` makes the direction of motion the second caption factor instead (4 words; every blob bright) —
the toy's first design, which no variant of the tiny teacher learned (data/synthetic.py, README). Runs on a GPU when
there is one (one process per variant fits many to a GPU); prints one JSON line per milestone.
"""

import argparse
import copy
import json
import sys
import time

import torch

import data.synthetic as S
from losses.flow import add_noise, flow_matching_loss, shift_timestep, teacher_sample
from models.wan import WAN_CONFIGS, WanModel, config_with

MILESTONES = (1000, 2000, 3000, 4000, 6000, 8000, 12000, 16000, 24000)
SETTINGS = dict(travel=10.0, jitter=3.0, frames=2, dim=48, heads=1, layers=2, ffn=128, shift=3.0, lr=1e-3, bs=16,
                cd=0.1, dirs=4)  # dirs: directions of motion drawn (4: right, left, down, up; 1: always right)


def make_data(factor: str, spec: S.ToySpec, num: int, seed: int, dirs: int = 4) -> S.ToyClips:
    """Toy clips whose caption's second word is brightness (the toy as is) or the direction of motion; with
    `dirs` < 4 (brightness only) the clips are re-rendered moving in the first `dirs` directions only."""
    if factor == "direction":
        return S.make_direction_clips(num, spec, seed)
    clips = S.make_clips(num, spec, seed)
    if dirs < len(S.DIRECTIONS):
        clips.directions = clips.directions % dirs
        clips.latents = S.render_clips(clips.factors, clips.directions, spec, torch.Generator().manual_seed(seed + 5))
    return clips


def decode(factor: str, latents: torch.Tensor) -> torch.Tensor:
    return S.decode_factors(latents) if factor == "brightness" else S.decode_direction_factors(latents)


def main(argv: list[str]) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--factor", choices=("brightness", "direction"), default="direction")
    parser.add_argument("--steps", type=int, default=MILESTONES[-1])
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="stop after this many seconds")
    parser.add_argument("--milestones", type=int, nargs="*", default=list(MILESTONES))
    parser.add_argument("--num-eval", type=int, default=96)
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help=f"override of {SETTINGS}")
    args = parser.parse_args(argv)
    p = dict(SETTINGS)
    for kv in args.set:
        key, value = kv.split("=", 1)
        if key not in p:
            raise SystemExit(f"--set {kv}: unknown key {key!r}; known: {', '.join(p)}")
        p[key] = type(p[key])(float(value))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    spec = S.ToySpec(frames=p["frames"], travel=p["travel"], jitter=p["jitter"])
    dirs = int(p["dirs"])
    train, held = make_data(args.factor, spec, 4800, 0, dirs), make_data(args.factor, spec, 240, 1_000_003, dirs)
    xs, cs = train.latents.to(dev), train.context.to(dev)
    torch.manual_seed(0)
    model = WanModel(config_with(WAN_CONFIGS["tiny"], dim=p["dim"], ffn_dim=p["ffn"], num_heads=p["heads"],
                                 num_layers=p["layers"])).to(dev)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], weight_decay=0.0)
    g = torch.Generator(device=dev).manual_seed(0)
    n = min(args.num_eval, held.latents.shape[0])
    ctx, fac = held.context[:n].to(dev), held.factors[:n]
    noise = torch.randn(held.latents[:n].shape, generator=torch.Generator().manual_seed(1234)).to(dev)
    rows, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(xs.shape[0], (p["bs"],), generator=g, device=dev)
        x0, c = xs[idx], cs[idx]
        t = shift_timestep(torch.rand(p["bs"], generator=g, device=dev) * 1000, p["shift"])
        eps = torch.randn(x0.shape, generator=g, device=dev)
        drop = torch.rand(p["bs"], generator=g, device=dev) < p["cd"]
        c = torch.where(drop[:, None, None], torch.zeros_like(c), c)  # caption dropout for CFG
        loss = flow_matching_loss(model(add_noise(x0, eps, t), t, c), eps, x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for e, w in zip(ema.parameters(), model.parameters()):
                e.lerp_(w, 0.01)
        last = step == args.steps or time.perf_counter() - start > args.budget_s
        if step in args.milestones or last:
            with torch.no_grad():
                x = teacher_sample(lambda x, t: ema(x, t, ctx), lambda x, t: ema(x, t, torch.zeros_like(ctx)), noise,
                                   args.sample_steps, p["shift"], 1.5).cpu()
            dec = decode(args.factor, x)
            row = dict(step=step, seconds=round(time.perf_counter() - start), factor=args.factor, **p,
                       accuracy=[round(float((dec[:, i] == fac[:, i]).double().mean()), 3) for i in range(3)],
                       frechet=round(S.frechet_distance(S.clip_features(x), S.clip_features(held.latents)), 2),
                       motion=round(float(S.motion_coherence(x, spec.travel).double().mean()), 3),
                       motion_chance=round(float(S.motion_coherence(S.shuffle_frames(x), spec.travel)
                                                 .double().mean()), 3),
                       temporal=round(S.frechet_distance(S.temporal_features(x, spec.travel),
                                                         S.temporal_features(held.latents, spec.travel),
                                                         standardise=False), 3))
            print(json.dumps(row), flush=True)
            rows.append(row)
        if last:
            break
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])
