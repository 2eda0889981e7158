"""Where the toy students' pixel noise comes from (issue 25), for runs of recipes/toy_sparse_distill.py.

On the GPU toy the students land at ~2x their teacher-50's Fréchet distance with ~1.5x its fine detail on the blob
(`scripts/eval_toy.py`'s texture column): pixel-scale noise. (Not what keeps their distance above teacher-50's, it
turned out: blurred, the students stay 1.4-2.1x it, the gap being the blobs' shape; `scripts/eval_toy.py --detail`,
README Performance "Where the distance lies".) Two measurements per run, on the held-out captions, from
the run's student/ and critic/ exports and its teacher ("fine detail" = x − its 3×3 binomial blur, every channel):

1. Does the DMD gradient see the noise? For the student's 3-step samples x0, with the recipe's own score timesteps (per
   clip, `--draws` draws each): g = (critic − teacher-with-CFG) x0 predictions at the noised x0, divided per clip by
   mean|x0 − real| as losses/dmd.py does. "Push" = Σ⟨detail(g), detail(x0)⟩ / Σ|detail(x0)|²: the share of the
   samples' fine detail one unit student step x0 ← x0 − g removes (> 0: DMD works against the noise), split by band
   of t. The same on the teacher's 50-step samples is the control.
2. Where does it enter? Each student step from the previous step's x0 (the chain of one noise draw) and `--draws`
   fresh noises: the prediction's fine detail, its noise-dependent part (the deviation from the draws' mean) and that
   part's gain over the input's noise-dependent fine detail, beside the teacher's x0 prediction (CFG) on the same
   inputs.

Measured (one NVIDIA H200, torch 2.11.0+cu130, 2026-12-04; the three students of `python scripts/demo.py --large
--teacher outputs/toy_teacher/large/teacher`, 240 captions; README Performance has the table): the push is positive in
every band (total: data +1.54, data-free +2.93, LoRA +1.45; on teacher-50 samples +0.30 / +1.48 / +0.36), so the
critic sees the noise and DMD works against it; the noise enters at the first step, whose x0 from pure noise keeps
7.6-9.5 % of the noise's fine detail (the teacher's x0 prediction 2.6 %), and the later steps keep what comes in: at
t = 522 the draws' mean still holds 0.038-0.045 of fine detail, the teacher's prediction on the same inputs 0.026-0.028.

Usage: python scripts/probe_toy_noise.py RUN [RUN ...] [--num 240] [--draws 4] [--device cuda]
"""

import argparse
from pathlib import Path

import torch

from data.synthetic import ToySpec, binomial_blur, make_split, teacher_cfg_sample
from data.toy_eval import CHUNK, critic_export, load_critic, load_student, load_teacher, read_run, student_row
from losses.flow import add_noise, sample_score_timesteps, x0_from_velocity

BANDS = ((0, 100), (100, 300), (300, 600), (600, 1001))  # score timesteps t


def fine_detail(latents: torch.Tensor) -> torch.Tensor:
    """(N, C, T, H, W) -> the same shape: every frame minus its 3×3 binomial blur."""
    return latents.float() - binomial_blur(latents)


def rms(x: torch.Tensor) -> float:
    return float(x.float().square().mean().sqrt())


def detail_projection(g: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Per clip ⟨detail(g), detail(x0)⟩, (N,): divided by Σ|detail(x0)|² it is the share of x0's fine detail that the
    step x0 ← x0 − g removes (g = c·x0 gives c)."""
    return (fine_detail(g) * fine_detail(x0)).flatten(1).sum(1)


def noise_dependent_detail(draws: torch.Tensor) -> float:
    """RMS fine detail of the part of K outputs (K, N, C, T, H, W) that differs between the draws (minus their mean)."""
    return rms(fine_detail((draws - draws.mean(0)).flatten(0, 1)))


def chunked(fn, *tensors: torch.Tensor) -> torch.Tensor:
    return torch.cat([fn(*(x[i:i + CHUNK] for x in tensors)) for i in range(0, tensors[0].shape[0], CHUNK)])


@torch.no_grad()
def probe(run: Path, num: int, draws: int, device: str) -> dict:
    """The two measurements of the module docstring for one run: fine detail RMS, push per band and total, and per
    student step the input's and both networks' fine detail."""
    cfg = read_run(run)
    data, dmd = cfg["data"], cfg["dmd"]
    spec = ToySpec(frames=data["frames"], height=data["height"], width=data["width"])
    _, heldout = make_split(spec, data["num_train"], data["num_heldout"], data["seed"])
    num = min(num, heldout.latents.shape[0])
    context, shape = heldout.context[:num].to(device), heldout.latents[:num].shape
    teacher = load_teacher(cfg["model"]).to(device)
    student, meta = load_student(run, shape, device=device)
    critic, critic_meta = load_critic(run, shape, device)
    w = dmd["guidance"]  # DMD2 form: real = cond + w·(cond − uncond)

    def real_x0(x_t, t, ctx):
        cond = x0_from_velocity(x_t, teacher(x_t, t, ctx), t)
        uncond = x0_from_velocity(x_t, teacher(x_t, t, torch.zeros_like(ctx)), t)
        return cond + w * (cond - uncond)

    def critic_x0(x_t, t, ctx):
        return x0_from_velocity(x_t, critic(x_t, t, ctx, attn_meta=critic_meta), t)

    def student_x0(x_t, t, ctx):
        return x0_from_velocity(x_t, student(x_t, t, ctx, attn_meta=meta), t)

    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1234)).to(device)
    g = torch.Generator(device).manual_seed(1235)
    student_3 = student_row(student, meta, dmd["steps"])
    samples = {
        "student-3": chunked(lambda x, c: student_3(x, c, g), noise, context),
        "teacher-50": chunked(lambda x, c: teacher_cfg_sample(teacher, c, x, 50, dmd["shift"], w + 1), noise, context),
    }
    detail = {"data": rms(fine_detail(heldout.latents[:num])), **{k: rms(fine_detail(x)) for k, x in samples.items()}}
    push = {}
    for name, x0 in samples.items():
        bands, norm = torch.zeros(len(BANDS), dtype=torch.float64), draws * float(fine_detail(x0).square().sum())
        for k in range(draws):  # the recipe's sampler, one t per clip (recipes/toy_sparse_distill.py student_step)
            t = sample_score_timesteps(num, dmd["shift"], dmd["t_min"], dmd["t_max"],
                                       torch.Generator().manual_seed(k)).to(device)
            x_t = add_noise(x0, torch.randn(shape, generator=g, device=device), t)
            real = chunked(real_x0, x_t, t, context)
            denom = (x0 - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
            per_clip = detail_projection((chunked(critic_x0, x_t, t, context) - real) / denom, x0).cpu()
            for b, (lo, hi) in enumerate(BANDS):
                bands[b] += float(per_clip[((t >= lo) & (t < hi)).cpu()].sum()) / norm
        push[name] = [*bands.tolist(), float(bands.sum())]
    steps, previous = [], None
    for step in dmd["steps"]:
        t = torch.full((num,), float(step), device=device)
        inputs = torch.stack([add_noise(previous, torch.randn(shape, generator=g, device=device), t)
                              if previous is not None else torch.randn(shape, generator=g, device=device)
                              for _ in range(draws)])
        row = {"step": step, "input": noise_dependent_detail(inputs)}
        for name, fn in (("student", student_x0), ("teacher", real_x0)):
            out = torch.stack([chunked(fn, x, t, context) for x in inputs])
            row[name] = {"detail": rms(fine_detail(out.flatten(0, 1))), "noise": noise_dependent_detail(out),
                         "draw_mean": rms(fine_detail(out.mean(0)))}
            row[name]["gain"] = row[name]["noise"] / row["input"]
            if name == "student":
                previous = out[0]  # the chain of the first draw, as the student's sampler runs it
        steps.append(row)
    return {"detail": detail, "push": push, "steps": steps}


def print_probe(run: Path, result: dict, draws: int) -> None:
    print(f"== {run}: fine detail RMS: " + ", ".join(f"{k} {v:.4f}" for k, v in result["detail"].items()))
    print("DMD push on the samples' fine detail (share one unit step removes; > 0: against it), by score timestep:")
    print(f"  {'samples':<12}" + "".join(f"{f't {lo}-{hi - 1}':>12}" for lo, hi in BANDS) + f"{'total':>9}")
    for name, values in result["push"].items():
        print(f"  {name:<12}" + "".join(f"{v:>+12.3f}" for v in values[:-1]) + f"{values[-1]:>+9.3f}")
    print(f"Each student step from the previous x0 and {draws} fresh noises: fine detail of the x0 prediction, its "
          "noise-dependent part and that part's gain over the input's")
    print(f"  {'step':>5} {'input':>8} | {'student':>8} {'noise':>8} {'gain':>6} | {'teacher':>8} {'noise':>8} "
          f"{'gain':>6} | {'draw mean: student':>18} {'teacher':>8}")
    for row in result["steps"]:
        s, t = row["student"], row["teacher"]
        print(f"  {row['step']:>5} {row['input']:>8.4f} | {s['detail']:>8.4f} {s['noise']:>8.4f} {s['gain']:>6.3f} | "
              f"{t['detail']:>8.4f} {t['noise']:>8.4f} {t['gain']:>6.3f} | {s['draw_mean']:>18.4f} "
              f"{t['draw_mean']:>8.4f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories of recipes/toy_sparse_distill.py")
    parser.add_argument("--num", type=int, default=240, help="held-out captions")
    parser.add_argument("--draws", type=int, default=4, help="score-timestep draws per clip; fresh noises per step")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.draws < 2:
        parser.error("--draws must be >= 2: the noise-dependent part is the spread between draws")
    for run in args.runs:  # every run directory checked before any sampling
        try:
            read_run(run), critic_export(run)
        except FileNotFoundError as err:
            parser.error(str(err))
    torch.set_num_threads(args.threads)
    for run in args.runs:
        print_probe(run, probe(run, args.num, args.draws, args.device), args.draws)


if __name__ == "__main__":
    main()
