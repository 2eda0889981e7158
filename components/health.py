"""Training health: catch a collapsing DMD run at the validation where it starts, not hours later in the videos.

A DMD run that leaves the teacher's distribution fails visibly — green or blue flashes, a solid colour, black frames,
noise (FastVideo issues #751, #1219, #1229, #1126, #503, #732) — and a VSA fine-tune can stall blurry (#1092). At every
validation the recipes compare the student's few-step samples with a *reference*: the teacher's many-step samples of the
same prompts from the same noise, generated once per run and cached in `<run>/health/` (a resume reuses them). The
statistics are model-free moments of the two sample sets, in latent and in pixel space; a guard marks the run
unhealthy when a watched statistic leaves its range for `patience` validations in a row, or when a loss or grad norm
diverges, keeps `<run>/ckpt/last_healthy`, and stops the run (or only warns).

    health = HealthGuard(cfg.health, run_dir, metrics, device, main_process=rank == 0)   # cfg.health: HealthConfig
    health.prepare(reference_key(weights, [contexts], settings), make, save)  # teacher + start samples, made once
    health.check_samples(step, latents, pixels)  # every rank at validation (pixels on the main one); logs health/*
    health.check_losses(step, logs)              # log steps: loss/dmd, loss/critic, grad_norm/* vs running medians
    health.checkpoint_saved(step, step_dir)      # <run>/ckpt/last_healthy once a validation vouches for it

The statistics (student vs reference; latents (N, C, T, H, W), pixels (N, 3, F, H, W) in [-1, 1]):
- `latent_mean_drift`, `pixel_mean_drift`: the largest per-channel |mean_student − mean_reference|, in reference stds
  (a colour cast, black or washed-out frames). Allowed: ≤ max_mean_drift.
- `latent_std_ratio`, `pixel_std_ratio`: the per-channel std ratio student / reference farthest from 1 (below 1: a
  solid colour or blur; above: noise or flashes). Allowed: [1 / max_std_ratio, max_std_ratio].
- `temporal_ratio`: mean |frame t+1 − frame t| of the latents, student / reference (frozen video vs flicker).
  Allowed: [1 / max_temporal_ratio, max_temporal_ratio]. Absent for single-frame latents.
- `saturation_ratio`: mean colour saturation (HSV chroma, max − min of RGB in [0, 1]), student / reference.
  Allowed: [1 / max_saturation_ratio, max_saturation_ratio].
- `clipping_excess`: the share of pixel values at or beyond ±1 (clipped in the video), student minus reference.
  Allowed: ≤ max_clip_excess.
- `latent_frechet`: Fréchet distance between Gaussians fitted to the latent token vectors (C-dimensional, one per
  position of every sample) of the two sets, in reference-std units, divided by C. Allowed: ≤ max_frechet.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import math
import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist

from components.config import ConfigError
from components.metrics import MetricsLogger, to_floats

# name -> (its limit in [health], kind): "ratio" is allowed in [1/x, x], "upper" up to x.
STATISTICS = {
    "latent_mean_drift": ("max_mean_drift", "upper"),
    "latent_std_ratio": ("max_std_ratio", "ratio"),
    "pixel_mean_drift": ("max_mean_drift", "upper"),
    "pixel_std_ratio": ("max_std_ratio", "ratio"),
    "temporal_ratio": ("max_temporal_ratio", "ratio"),
    "saturation_ratio": ("max_saturation_ratio", "ratio"),
    "clipping_excess": ("max_clip_excess", "upper"),
    "latent_frechet": ("max_frechet", "upper"),
}
LOSS_KEYS = ("loss/dmd", "loss/critic", "grad_norm/student", "grad_norm/critic")
LOSS_WINDOW = 50  # log steps in a loss's running median
LOSS_WARMUP = 5  # log steps of history before a loss can diverge (the first steps of a run are noisy)
CLIP_LEVEL = 1 - 1 / 255  # |pixel| at or above this is one uint8 level from (or beyond) the end of the range
STD_FLOOR = 1e-3  # reference stds below this fraction of the largest are raised to it (an empty channel)


class UnhealthyRun(RuntimeError):
    """The guard stopped the run (health.action = "stop"): its message names the statistic and its range."""


@dataclass
class HealthConfig:
    """The recipes' `[health]` table (shared by all four: STYLE's third copy moves into a package). Operational only:
    nothing here changes the loss curve. The default ranges hold for the healthy toy runs and trip on its collapses
    (tests/test_health.py); checked when the config loads, before any model is built."""

    action: Literal["stop", "warn", "off"] = "stop"  # unhealthy -> exit non-zero / only print; "off": no statistics
    patience: int = 2  # validations (or log steps, for the losses) in a row out of range before the run is unhealthy
    teacher_steps: int = 50  # the reference: Euler steps of the teacher with CFG, once per run (cached in <run>/health)
    teacher_shift: float = 3.0  # flow shift of that sampler
    watch: list[str] = field(default_factory=lambda: list(STATISTICS))  # statistics the guard checks (all are logged)
    max_mean_drift: float = 0.5  # |mean student - mean teacher| per channel, in teacher stds (latents and pixels)
    max_std_ratio: float = 2.0  # per-channel std student / teacher within [1/x, x] (latents and pixels)
    max_temporal_ratio: float = 2.0  # mean frame-to-frame change student / teacher within [1/x, x]
    max_saturation_ratio: float = 1.75  # mean colour saturation student / teacher within [1/x, x]
    max_clip_excess: float = 0.1  # share of clipped pixel values, student minus teacher
    max_frechet: float = 1.0  # Fréchet distance of the latent token Gaussians (teacher-std units, per channel)
    loss_factor: float = 10.0  # a loss or grad norm above x times its running median (or non-finite) diverges

    def __post_init__(self) -> None:
        check_settings(self)

    @property
    def limits(self) -> dict[str, float]:
        return {name: getattr(self, name) for name, _ in STATISTICS.values()}


# ------------------------------------------------------------------------------------------------------ statistics
@torch.no_grad()
def summarize(latents: torch.Tensor, pixels: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The moments the statistics need, of a sample set: latents (N, C, T, H, W) and their pixels (N, 3, F, H, W) in
    [-1, 1] (None: no pixel statistics). Small CPU float64 tensors, whatever the size of the samples."""
    x = latents.detach().double()
    tokens = x.transpose(0, 1).reshape(x.shape[1], -1)  # (C, N·T·H·W)
    mean = tokens.mean(dim=1)
    centred = tokens - mean[:, None]
    out = {"latent_mean": mean, "latent_cov": centred @ centred.T / max(tokens.shape[1] - 1, 1)}  # (C,), (C, C)
    if x.shape[2] > 1:
        out["temporal"] = (x[:, :, 1:] - x[:, :, :-1]).abs().mean()
    if pixels is not None:
        total, squares = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
        chroma, clipped = 0.0, 0.0
        for clip in pixels.detach():  # (3, F, H, W): one clip at a time, a 480p clip of 77 frames is ~1 GiB in fp32
            flat = clip.float().reshape(3, -1)
            total += flat.sum(dim=1, dtype=torch.float64).cpu()
            squares += flat.square().sum(dim=1, dtype=torch.float64).cpu()
            rgb = ((flat + 1) / 2).clamp(0, 1)
            chroma += float((rgb.amax(dim=0) - rgb.amin(dim=0)).sum(dtype=torch.float64))
            clipped += float((flat.abs() >= CLIP_LEVEL).sum())
        n = pixels[:, 0].numel()  # values per channel
        pixel_mean = total / n
        out.update(pixel_mean=pixel_mean, pixel_std=(squares / n - pixel_mean**2).clamp_min(0).sqrt(),
                   saturation=torch.tensor(chroma / n, dtype=torch.float64),
                   clipping=torch.tensor(clipped / (3 * n), dtype=torch.float64))
    return {k: v.cpu() for k, v in out.items()}


def compare_samples(student: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, float]:
    """`health/<name>` for every statistic both summaries support (pixel ones need pixels, temporal_ratio frames)."""
    ref_std = reference["latent_cov"].diagonal().clamp_min(0).sqrt()
    floor = STD_FLOOR * float(ref_std.max()) + 1e-12
    scale = ref_std.clamp_min(floor)  # (C,)
    student_std = student["latent_cov"].diagonal().clamp_min(0).sqrt()
    out = {
        "latent_mean_drift": mean_drift(student["latent_mean"], reference["latent_mean"], scale),
        "latent_std_ratio": worst_ratio(student_std.clamp_min(floor), scale),
        "latent_frechet": frechet_distance(
            (student["latent_mean"] - reference["latent_mean"]) / scale, student["latent_cov"] / torch.outer(scale, scale),
            torch.zeros_like(scale), reference["latent_cov"] / torch.outer(scale, scale)) / len(scale),
    }
    if "temporal" in student and "temporal" in reference:
        out["temporal_ratio"] = ratio(student["temporal"], reference["temporal"])
    if "pixel_mean" in student and "pixel_mean" in reference:
        floor = STD_FLOOR * float(reference["pixel_std"].max()) + 1e-12
        pixel_scale = reference["pixel_std"].clamp_min(floor)
        out.update(pixel_mean_drift=mean_drift(student["pixel_mean"], reference["pixel_mean"], pixel_scale),
                   pixel_std_ratio=worst_ratio(student["pixel_std"].clamp_min(floor), pixel_scale),
                   saturation_ratio=ratio(student["saturation"], reference["saturation"]),
                   clipping_excess=float(student["clipping"] - reference["clipping"]))
    return {f"health/{name}": out[name] for name in STATISTICS if name in out}


def mean_drift(mean: torch.Tensor, reference_mean: torch.Tensor, scale: torch.Tensor) -> float:
    return float(((mean - reference_mean).abs() / scale).max())


def worst_ratio(std: torch.Tensor, reference_std: torch.Tensor) -> float:
    """The per-channel ratio std / reference_std farthest from 1 (in log scale: 0.5 and 2 are as far)."""
    r = std / reference_std
    return float(r[r.log().abs().nan_to_num(math.inf).argmax()])  # a NaN ratio is the worst


def ratio(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float(value / reference.clamp_min(1e-12))


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """|mu1 − mu2|² + tr(cov1 + cov2 − 2 (cov1^½ cov2 cov1^½)^½), the 2-Wasserstein distance of two Gaussians."""
    if not (torch.isfinite(cov1).all() and torch.isfinite(mu1).all()):
        return math.nan
    root1 = psd_sqrt(cov1)
    cross = psd_sqrt(root1 @ cov2 @ root1)
    return float((mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * cross.trace())


def psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (negative round-off eigenvalues clamped to 0)."""
    values, vectors = torch.linalg.eigh((m + m.T) / 2)
    return vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T


def allowed_range(name: str, limits: dict[str, float], start: float | None = None) -> tuple[float, float]:
    """(low, high) of statistic `name` under `limits` ({limit field: value}): the teacher's neighbourhood ([1/x, x] for
    a ratio, up to x for a distance), widened to reach a half-width neighbourhood of the `start` value ([start/√x,
    start·√x], up to start + x/2): the student before training (few-step sampling of the teacher's weights, or of an
    earlier student) is no collapse, but is not the teacher either."""
    limit, kind = STATISTICS[name]
    x = limits[limit]
    low, high = (1 / x, x) if kind == "ratio" else (-math.inf, x)
    if start is None or not math.isfinite(start):
        return low, high
    if kind == "ratio":
        return min(low, start / math.sqrt(x)), max(high, start * math.sqrt(x))
    return low, max(high, start + x / 2)


# ------------------------------------------------------------------------------------------------------- reference
def reference_key(weights: Path, tensors: list[torch.Tensor], settings: dict[str, object]) -> str:
    """16 hex digits naming a reference: the teacher's weights (each safetensors file's name, size, first and last
    MiB: cheap at 28 GB, and a seeded random init written again on resume hashes the same), the prompt embeddings
    `tensors`, and the seeds and sampler `settings`."""
    h = hashlib.sha256()
    for path in sorted(Path(weights).rglob("*.safetensors")):
        size = path.stat().st_size
        h.update(f"{path.relative_to(weights)}:{size}".encode())
        with open(path, "rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(size - (1 << 20), 0))
            h.update(f.read())
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------- guard
class HealthGuard:
    """Counts validations whose statistics leave their ranges and log steps whose losses or grad norms diverge; after
    `patience` of either in a row the run is unhealthy: the message names each statistic and its range, and the run
    stops (UnhealthyRun) or only warns. Keeps `<run>/ckpt/last_healthy`: a symlink to a hard-linked copy
    `<run>/ckpt/healthy/step-NNNNNN/` of the newest checkpoint with in-range validations at (or before) it and after
    it, so rotating checkpoints never deletes it.

    Every rank constructs it and calls `check_*` at the same steps (they agree over ranks in one all-reduce); only the
    main process computes statistics, logs, prints and writes files. Counts are per launch (a resume starts afresh)."""

    def __init__(self, cfg: HealthConfig, run_dir: Path, metrics: MetricsLogger, device: torch.device | str = "cpu",
                 main_process: bool = True, resume: bool = True) -> None:
        self.cfg, self.limits, self.metrics = cfg, cfg.limits, metrics
        self.run_dir, self.ckpt_dir = Path(run_dir), Path(run_dir) / "ckpt"
        self.device, self.main_process = torch.device(device), main_process
        self.reference: dict[str, torch.Tensor] | None = None  # the teacher's summary (main process)
        self.start: dict[str, float] = {}  # the student's statistics before training (main process)
        self.samples_in_row, self.losses_in_row, self.bad_steps = 0, 0, []
        self.history: dict[str, list[float]] = {}  # finite values per loss key, for the running medians
        # (step, in range) of the last validation, and a checkpoint waiting for the next one's verdict; kept in
        # <run>/health/guard.json so that a relaunch still vouches for the checkpoint it resumed from.
        self.state_file = self.run_dir / "health" / "guard.json"
        state = json.loads(self.state_file.read_text()) if resume and self.state_file.is_file() else {}
        self.last_validation: tuple[int, bool] | None = tuple(state["last"]) if state.get("last") else None
        self.pending: tuple[int, Path] | None = (state["pending"][0], Path(state["pending"][1])) if state.get(
            "pending") else None

    @property
    def enabled(self) -> bool:
        return self.cfg.action != "off"

    def prepare(self, key: str, make: Callable[[], tuple[torch.Tensor, torch.Tensor]],
                save: Callable[[torch.Tensor, str], torch.Tensor] | None,
                autocast: contextlib.AbstractContextManager | None = None) -> None:
        """The reference, from `<run>/health/reference-<key>.pt` or made now and cached there: `make()` returns the
        teacher's many-step samples and the student's samples before training, on the validation prompts and noise
        (every rank runs it: the networks may be sharded); `save(latents, tag)` (main process only; None elsewhere)
        writes a set's videos under `tag` ("reference", "start") and returns its pixels (N, 3, F, H, W) in [-1, 1]. The
        student's start is where every range widens to (`allowed_range`); a launch that finds no cache (a fresh run,
        or health switched on mid-run) takes the student it has."""
        path, made = self.run_dir / "health" / f"reference-{key}.pt", False
        if not path.is_file():  # every rank decides before any rank could have written it
            t0 = time.perf_counter()
            with autocast or contextlib.nullcontext():  # the recipe's bf16 autocast
                teacher, student = make()
            if save is not None:
                summaries = {"teacher": summarize(teacher, save(teacher, "reference")),
                             "start": summarize(student, save(student, "start"))}
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                torch.save({"summaries": summaries, "teacher": teacher.cpu(), "start": student.cpu()}, tmp)
                os.replace(tmp, path)  # a run killed mid-write leaves no half-written cache
                self.metrics.log(0, {"time/reference_s": time.perf_counter() - t0})
            made = True
        if self.main_process:
            summaries = torch.load(path, weights_only=True)["summaries"]
            self.reference = summaries["teacher"]
            self.start = compare_samples(summaries["start"], self.reference)
            if made:
                self.metrics.log(0, self.start)  # the start of the health/* series
        if made:  # the student before training is the baseline: its checkpoint (the toy saves one) is healthy
            self.last_validation = (0, True)

    def out_of_range(self, stats: dict[str, float]) -> list[str]:
        """One line per watched statistic of `stats` ({"health/<name>": value}) outside its range (NaN is outside)."""
        reasons = []
        for name in self.cfg.watch:
            value = stats.get(f"health/{name}")
            if value is None:
                continue
            low, high = allowed_range(name, self.limits, self.start.get(f"health/{name}"))
            if not low <= value <= high:
                limit = STATISTICS[name][0]
                shown = f"[{low:.3g}, {high:.3g}]" if low > -math.inf else f"<= {high:.3g}"
                reasons.append(f"health/{name} = {value:.4g} left its range {shown} "
                               f"(health.{limit} = {self.limits[limit]:g})")
        return reasons

    def check_samples(self, step: int, latents: torch.Tensor | None, pixels: torch.Tensor | None) -> dict[str, float]:
        """A validation's student samples: latents (N, C, T, H, W) and pixels (N, 3, F, H, W) in [-1, 1], needed on the
        main process only. Logs and returns the statistics ({} elsewhere); collective when the run is distributed."""
        if not self.enabled:
            return {}
        stats = {}
        if self.main_process:
            t0 = time.perf_counter()
            stats = compare_samples(summarize(latents, pixels), self.reference)
            self.metrics.log(step, {**stats, "time/health_s": time.perf_counter() - t0})
        reasons = self.out_of_range(stats)
        bad = self.agree(bool(reasons))
        previous_ok = self.last_validation is None or self.last_validation[1]
        self.last_validation = (step, not bad)
        if not bad:
            self.samples_in_row = 0
            if self.pending is not None and previous_ok and self.losses_in_row == 0:
                self.mark(*self.pending)  # in range at (or before) it and after it: the student there is fine
            self.pending = None
            self.save_state()
            return stats
        self.samples_in_row, self.pending = self.samples_in_row + 1, None
        self.save_state()
        self.bad_steps.append(step)
        reasons = reasons or ["a statistic left its range (see the main process's log)"]
        if self.main_process:
            print(f"step {step}: health: " + "; ".join(reasons) + f" ({self.samples_in_row}/{self.cfg.patience})",
                  flush=True)
        if self.samples_in_row >= self.cfg.patience:
            steps = ", ".join(str(s) for s in self.bad_steps[-self.samples_in_row:])
            self.unhealthy(step, reasons, f"at {self.samples_in_row} validations in a row (steps {steps})")
            self.samples_in_row = 0  # action = "warn": count afresh
        return stats

    def check_losses(self, step: int, logs: dict[str, float | torch.Tensor]) -> None:
        """A log step's losses and grad norms (the keys of LOSS_KEYS present in `logs`): a value diverges when it is
        non-finite or above `loss_factor` × its running median. Collective when the run is distributed."""
        if not self.enabled:
            return
        reasons = []
        for key, value in to_floats({k: logs[k] for k in LOSS_KEYS if k in logs}).items():
            history = self.history.setdefault(key, [])
            median = statistics.median(history[-LOSS_WINDOW:]) if len(history) >= LOSS_WARMUP else math.inf
            if not math.isfinite(value):
                reasons.append(f"{key} = {value} is not finite")
            elif value > self.cfg.loss_factor * median:
                reasons.append(f"{key} = {value:.4g} is above {self.cfg.loss_factor:g} x its running median {median:.4g} "
                               f"(health.loss_factor)")
            if math.isfinite(value):
                history.append(value)
        bad = self.agree(bool(reasons))
        self.losses_in_row = self.losses_in_row + 1 if bad else 0
        if bad and self.main_process:
            print(f"step {step}: health: " + "; ".join(reasons) + f" ({self.losses_in_row}/{self.cfg.patience})", flush=True)
        if self.losses_in_row >= self.cfg.patience:
            self.unhealthy(step, reasons or ["a loss diverged on another rank"],
                           f"at {self.losses_in_row} log steps in a row")
            self.losses_in_row = 0

    def checkpoint_saved(self, step: int, step_dir: Path) -> None:
        """A training-state checkpoint of `step` now exists in `step_dir`: marked healthy once the next validation is
        in range too (a collapse that starts just before a checkpoint often shows one validation later); the
        student before training (step 0, a fresh run) is healthy at once."""
        if not self.enabled:
            return
        if step == 0 and self.last_validation == (0, True):
            self.mark(step, step_dir)
        else:
            self.pending = (step, Path(step_dir))
            self.save_state()

    def save_state(self) -> None:
        if self.main_process:
            pending = [self.pending[0], str(self.pending[1])] if self.pending else None
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            self.state_file.write_text(json.dumps({"last": self.last_validation, "pending": pending}))

    def mark(self, step: int, step_dir: Path) -> None:
        if self.main_process and Path(step_dir).is_dir():  # (a relaunch may have pruned it)
            copy = mark_healthy(self.ckpt_dir, Path(step_dir))
            print(f"step {step}: health: {self.ckpt_dir / 'last_healthy'} -> {copy}", flush=True)

    def unhealthy(self, step: int, reasons: list[str], when: str) -> None:
        link = self.ckpt_dir / "last_healthy"
        last = f"{link} -> {os.readlink(link)}" if link.is_symlink() else f"none yet ({link} does not exist)"
        message = (f"run unhealthy at step {step}, {when}: " + "; ".join(reasons) + f". Last healthy checkpoint: {last}."
                   " Look at the samples; lower the learning rates or the guidance, or widen the range in [health]"
                   " if the teacher's neighbourhood is too narrow for this model.")
        if self.cfg.action == "stop":
            raise UnhealthyRun(message)
        if self.main_process:
            print(f"WARNING (health.action = warn, continuing): {message}", flush=True)

    def agree(self, flag: bool) -> bool:
        """True on every rank if it is True on any (the main process alone computes the sample statistics)."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def check_settings(cfg: HealthConfig) -> None:
    """One ConfigError naming every bad `[health]` field and its fix."""
    errors = []
    if cfg.action not in ("stop", "warn", "off"):
        errors.append(f"health.action={cfg.action!r}: choose 'stop', 'warn' or 'off'")
    for key in ("patience", "teacher_steps"):
        if getattr(cfg, key) < 1:
            errors.append(f"health.{key}={getattr(cfg, key)}: must be >= 1")
    if not cfg.teacher_shift > 0:
        errors.append(f"health.teacher_shift={cfg.teacher_shift}: must be > 0")
    for name in cfg.watch:
        if name not in STATISTICS:
            close = difflib.get_close_matches(name, list(STATISTICS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            errors.append(f"health.watch: unknown statistic '{name}'{hint}; known: {', '.join(STATISTICS)}")
    if len(set(cfg.watch)) != len(cfg.watch):
        errors.append(f"health.watch lists a statistic twice: {cfg.watch}")
    kinds = dict(STATISTICS.values())  # limit name -> kind
    for name, value in cfg.limits.items():
        if kinds[name] == "ratio" and not value >= 1:
            errors.append(f"health.{name}={value}: must be >= 1 (the allowed range is [1/x, x])")
        elif kinds[name] == "upper" and not value >= 0:
            errors.append(f"health.{name}={value}: must be >= 0 (a threshold on a distance)")
    if not cfg.loss_factor > 1:
        errors.append(f"health.loss_factor={cfg.loss_factor}: must be > 1 (a multiple of the running median)")
    if errors:
        raise ConfigError("bad [health] table:\n  " + "\n  ".join(errors))


def mark_healthy(ckpt_dir: Path, step_dir: Path) -> Path:
    """Point `<ckpt_dir>/last_healthy` at a copy `<ckpt_dir>/healthy/<step_dir name>/` of `step_dir` made of hard
    links (no extra disk while the original exists; the files survive its deletion by checkpoint rotation; a real
    copy where the filesystem has no hard links). The previous healthy copy is removed. Returns the copy."""
    healthy = ckpt_dir / "healthy"
    copy = healthy / step_dir.name
    if not copy.exists():
        tmp = healthy / f".{step_dir.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            shutil.copytree(step_dir, tmp, copy_function=os.link)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(step_dir, tmp)
        os.replace(tmp, copy)
    link, tmp_link = ckpt_dir / "last_healthy", ckpt_dir / ".last_healthy.tmp"
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(copy.relative_to(ckpt_dir))  # relative: the run directory can move
    os.replace(tmp_link, link)
    for old in healthy.iterdir():
        if old != copy and not old.name.startswith("."):
            shutil.rmtree(old)
    return copy
