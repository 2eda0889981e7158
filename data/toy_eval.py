"""The toy's quality table (scripts/eval_toy.py is its CLI): each toy_sparse_distill run's student, its frozen teacher
at 50 and 3 steps, and fresh / frozen real clips, scored on the held-out captions (data/synthetic.py
`evaluate_samples`). Shared by scripts/eval_toy.py and scripts/make_toy_experts.py; recipes/toy_sparse_distill.py
checks its [model] table, builds its teacher and writes its student checkpoints here, so what the table loads is what
the recipe built and saved."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import torch

from attention.sdpa import sdpa_attention
from attention.vsa import dense_gated_attention, vsa_attention, vsa_masked, vsa_meta
from data.synthetic import ToySpec, evaluate_samples, make_clips, make_split, teacher_cfg_sample
from inference.samplers import TwoExperts
from losses.flow import few_step_sample
from models.lora import export_weights
from models.wan_weights import export_state_dict, load_pretrained

CHUNK = 48  # clips per network call


def read_run(run_dir: Path) -> dict:
    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass a run directory of recipes/toy_sparse_distill.py")
    return tomllib.loads(path.read_text())


@torch.no_grad()
def sample_rows(cfg: dict, students: dict[str, tuple[Path, str]], num: int, seed: int = 1234,
                device: str = "cpu") -> dict[str, dict[str, float]]:
    """Sample every row for the first `num` held-out clips and score them; the networks run on `device` ("cuda": VSA
    as `vsa_masked`, the toy's head dims not being the kernels'), from the same CPU-drawn noise."""
    data, dmd = cfg["data"], cfg["dmd"]
    spec = ToySpec(frames=data["frames"], height=data["height"], width=data["width"])
    _, heldout = make_split(spec, data["num_train"], data["num_heldout"], data["seed"])
    num = min(num, heldout.latents.shape[0])
    context, factors = heldout.context[:num].to(device), heldout.factors[:num]
    noise = torch.randn(heldout.latents[:num].shape, generator=torch.Generator().manual_seed(seed)).to(device)
    teacher = load_teacher(cfg["model"]).to(device)
    w = dmd["guidance"]  # DMD2 form; standard CFG scale w + 1

    def teacher_euler(num_steps):
        return lambda x, ctx: teacher_cfg_sample(teacher, ctx, x, num_steps, dmd["shift"], w + 1)

    def teacher_dmd(x, ctx, g):
        def cfg_fn(x, t):
            cond, uncond = teacher(x, t, ctx), teacher(x, t, torch.zeros_like(ctx))
            return cond + w * (cond - uncond)
        return few_step_sample(cfg_fn, x, dmd["steps"], g)

    rows = {"teacher-50": lambda x, ctx, g: teacher_euler(50)(x, ctx),
            "teacher-3": lambda x, ctx, g: teacher_euler(3)(x, ctx),
            "teacher-3-dmd": teacher_dmd}
    for name, (path, export) in students.items():  # (run directory, its export: "student" or "student_ema")
        student, meta = load_student(path, noise.shape, export, device)
        rows[name] = student_row(student, meta, dmd["steps"])

    table = {}
    for name, fn in rows.items():
        g = torch.Generator(device).manual_seed(seed + 1)
        chunks = [fn(noise[i:i + CHUNK], context[i:i + CHUNK], g).cpu() for i in range(0, num, CHUNK)]
        table[name] = evaluate_samples(torch.cat(chunks), factors, heldout)
    fresh = make_clips(num, spec, data["seed"] + 17)  # the floor: a new draw of real clips
    table["data (fresh clips)"] = evaluate_samples(fresh.latents, fresh.factors, heldout)
    frozen = fresh.latents[:, :, :1].expand_as(fresh.latents)  # the frozen-motion baseline: every frame the first
    table["data (frozen clips)"] = evaluate_samples(frozen, fresh.factors, heldout)
    return table


def check_model(model: dict, lora_rank: int) -> None:
    """A toy run's [model] table, before any network is built: the two-expert keys go together, only a two-expert
    teacher has a low-noise expert to start from or score with, and LoRA's one frozen base is the one teacher.
    ValueError names the key and the fix."""
    two = model.get("teacher_2") is not None
    if two != (model.get("boundary") is not None):
        raise ValueError("model.teacher_2 and model.boundary go together: set both (e.g. model.boundary=0.875) or "
                         "neither")
    if two and not 0 < model["boundary"] < 1:
        raise ValueError(f"model.boundary {model['boundary']} is a ratio of the 1000 timesteps: set it in (0, 1)")
    if not two and "low" in (model.get("init"), model.get("real_score")):
        raise ValueError("model.init / model.real_score = \"low\" need a low-noise expert: set model.teacher_2")
    if lora_rank and model.get("student") is not None:
        raise ValueError("LoRA mode starts both adapters from the teacher: leave model.student unset")
    if lora_rank and two:
        raise ValueError("LoRA mode shares one frozen base: a two-expert teacher (model.teacher_2) needs lora.rank=0")


def load_teacher(model: dict, device: str = "cpu"):
    """A toy run's frozen dense teacher from its [model] table: one network, or with model.teacher_2 two experts
    switching at model.boundary (the high-noise model.teacher for t >= boundary · 1000; inference/samplers.py
    TwoExperts). recipes/toy_sparse_distill.py builds its teacher here, so the table scores the teacher it distilled."""
    def dense(path) -> torch.nn.Module:
        return load_pretrained(path, attn_fn=sdpa_attention, vsa_gate=False).requires_grad_(False).eval().to(device)

    if model.get("teacher_2") is None:
        return dense(model["teacher"])
    return TwoExperts(dense(model["teacher"]), dense(model["teacher_2"]), model["boundary"] * 1000).eval()


def load_student(run_dir: Path, shape, export: str = "student", device: str = "cpu"):
    """A run's student export (`student` or `student_ema`) with its attention, and its VSA metadata (None when dense)
    for clips of `shape` (N, C, T, H, W). On CUDA VSA is `vsa_masked`: the toy's head dims are not the kernels'."""
    attn = read_run(run_dir)["attn"]
    vsa = attn["student"] == "vsa"
    vsa_fn = vsa_masked if device == "cuda" else vsa_attention
    student = load_pretrained(Path(run_dir) / export, attn_fn=vsa_fn if vsa else sdpa_attention).eval().to(device)
    return student, vsa_meta(student.token_grid(shape), attn["sparsity"], device) if vsa else None


def save_student(student, ckpt_dir: Path, step: int, keep: int) -> Path:
    """A toy run's checkpoint: the student export (LoRA: merged) in ckpt/step-NNNNNN/; keeps the newest `keep`."""
    out = Path(ckpt_dir) / f"step-{step:06d}"
    export_state_dict(export_weights(student), student.cfg, out)
    for old in sorted(Path(ckpt_dir).glob("step-*"))[:-keep]:
        shutil.rmtree(old)
    return out


def load_critic(run_dir: Path, shape, device: str = "cpu"):
    """A run's final critic (critic/, written since 2026-12-04) and its metadata: with attn.critic = "dense_gated" the
    coarse branch's tiles at sparsity 0, as the recipe builds it."""
    path = critic_export(run_dir)
    gated = read_run(run_dir)["attn"]["critic"] == "dense_gated"
    critic = load_pretrained(path, attn_fn=dense_gated_attention if gated else sdpa_attention).eval().to(device)
    return critic, vsa_meta(critic.token_grid(shape), 0.0, device) if gated else None


def critic_export(run_dir: Path) -> Path:
    """<run>/critic, or FileNotFoundError naming it and the fix."""
    path = Path(run_dir) / "critic"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} not found: the run predates the critic export; rerun "
                                "recipes/toy_sparse_distill.py (it writes <run>/critic at the end)")
    return path


@torch.no_grad()
def sample_student(student, meta, context: torch.Tensor, shape, steps, seed: int) -> torch.Tensor:
    """The student's few-step samples (returned on the CPU) of `context` (on the run's device) from CPU-drawn noise, so
    that a CPU and a CUDA run validate on the same noise; the re-noising draws come from a generator on the device."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(tuple(shape), generator=g).to(context.device)
    if context.device.type != "cpu":  # few_step_sample draws its fresh noise on the samples' device
        g = torch.Generator(context.device).manual_seed(seed)
    return student_row(student, meta, steps)(noise, context, g).cpu()


@torch.no_grad()
def sample_teacher(teacher, context: torch.Tensor, shape, num_steps: int, shift: float, guidance: float,
                   seed: int) -> torch.Tensor:
    """data/synthetic.py `teacher_cfg_sample` (returned on the CPU; `guidance` in the DMD2 form w, standard scale
    w + 1) from the same CPU-drawn noise as `sample_student`'s."""
    noise = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed)).to(context.device)
    return teacher_cfg_sample(teacher, context, noise, num_steps, shift, guidance + 1).cpu()


def student_row(student, meta, steps):
    """The student's own 3-step sampler (docs/METHOD.md §5.2): conditional only, no CFG."""
    def run(x, ctx, g):
        return few_step_sample(lambda x, t: student(x, t, ctx, attn_meta=meta), x, steps, g)
    return run


def student_label(run_cfg: dict) -> str:
    """The row name of a run's student, from its saved config: the rollout mode, and for a LoRA run (lora.rank > 0)
    its rank and, when not low-rank, the gate's form, so a LoRA run never shares the full-fine-tune run's row."""
    rollout, lora = run_cfg["dmd"]["rollout"], run_cfg.get("lora", {})
    if not lora.get("rank", 0):
        return f"student-3 ({rollout})"
    gate = ", full gate" if lora["gate"] == "full" else ""
    return f"student-3 ({rollout}, LoRA r{lora['rank']}{gate})"


def student_rows(runs: list[Path], ema: bool = False) -> dict[str, tuple[Path, str]]:
    """{row name: (run directory, export)}: `student_label`, and for runs that share one (a sweep over other settings)
    the label followed by the run directory's name. With `ema`, each run's EMA export (student_ema/, run.ema_decay > 0)
    gets a row of its own after the run's, "student-3 (data, EMA)". Raises ValueError when a directory is given twice
    or, with `ema`, when no run has an EMA export."""
    labels = [student_label(read_run(r)) for r in runs]
    labels = [f"{label} [{Path(r).name}]" if labels.count(label) > 1 else label for label, r in zip(labels, runs)]
    if len(set(labels)) < len(labels):
        raise ValueError(f"two runs would be the same row: pass each run directory once (rows {labels})")
    rows = {}
    for label, run in zip(labels, runs):
        rows[label] = (run, "student")
        if ema and (Path(run) / "student_ema" / "config.json").is_file():
            rows[label.replace(")", ", EMA)", 1)] = (run, "student_ema")
    if ema and len(rows) == len(runs):
        raise ValueError("--ema: no run has a student_ema/ export (train with run.ema_decay > 0)")
    return rows


def print_table(table: dict[str, dict[str, float]]) -> None:
    ref, width = table["teacher-50"]["frechet"], max(22, *(len(name) + 2 for name in table))
    print(f"{'row':<{width}}{'frechet':>10}{'÷ teacher-50':>14}{'temporal':>10}{'cond acc':>10}{'motion':>9}"
          f"{'chance':>9}{'texture':>9}")
    for name, r in table.items():
        print(f"{name:<{width}}{r['frechet']:>10.3f}{r['frechet'] / ref:>14.2f}{r['temporal']:>10.3f}"
              f"{100 * r['cond_acc']:>9.1f}%{100 * r['motion']:>8.1f}%{100 * r['motion_chance']:>8.1f}%"
              f"{r['texture']:>9.2f}")


def print_detail(table: dict[str, dict[str, float]]) -> None:
    """Where each row's distance lies: its mean and covariance terms, the distance once pixel noise is blurred away
    (÷ teacher-50's, blurred alike), and the distance on each feature group alone (data/synthetic.py
    `evaluate_samples`)."""
    ref_blur = table["teacher-50"]["frechet_blur"]
    width = max(22, *(len(name) + 2 for name in table))
    print(f"{'row':<{width}}{'frechet':>10}{'mean':>8}{'cov':>8}{'blurred':>10}{'÷ t-50':>8}{'position':>10}"
          f"{'shape':>8}{'colour':>8}")
    for name, r in table.items():
        print(f"{name:<{width}}{r['frechet']:>10.3f}{r['frechet_mean']:>8.3f}{r['frechet'] - r['frechet_mean']:>8.3f}"
              f"{r['frechet_blur']:>10.3f}{r['frechet_blur'] / ref_blur:>8.2f}{r['frechet_position']:>10.3f}"
              f"{r['frechet_shape']:>8.3f}{r['frechet_colour']:>8.3f}")
