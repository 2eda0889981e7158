"""The health history of a run: a table and a PNG plot of its `health/*` series (components/health.py).

    python tools/health_report.py outputs/toy_sparse_distill/demo            # table; plot in RUN_DIR/health.png
    python tools/health_report.py RUN_DIR --png /tmp/health.png

Reads RUN_DIR/metrics.jsonl (the last row of a step wins: a resumed run logs some steps again) and the `[health]` table
of RUN_DIR/config.toml (the ranges, the watched statistics). Step 0 holds the student before training, where each range
widens to (the guard's rule, `allowed_range`). The table has one row per validation, '*' marking a watched statistic
out of its range; the plot has one panel per statistic: the series, its range shaded, out-of-range points in red
(ratios on a log scale). Drawn with Pillow (a dependency of imageio): no plotting library needed.
"""

import argparse
import functools
import json
import math
import os
import sys
import tomllib
from pathlib import Path

from PIL import Image, ImageDraw

from components.health import STATISTICS, HealthConfig, allowed_range

PANEL_W, PANEL_H, MARGIN = 460, 220, 48  # pixels per panel, and its inner margin for labels


def read_series(run_dir: Path) -> dict[int, dict[str, float | None]]:
    """step -> {statistic name: value} for every step that logged a health/* value."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path} not found: pass a run directory of a recipe with [health] (it writes metrics.jsonl)")
    steps: dict[int, dict[str, float | None]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        values = {k.removeprefix("health/"): v for k, v in row.items() if k.startswith("health/")}
        if values:
            steps.setdefault(row["step"], {}).update(values)
    return dict(sorted(steps.items()))


def read_config(run_dir: Path) -> HealthConfig:
    path = run_dir / "config.toml"
    table = tomllib.loads(path.read_text()).get("health", {}) if path.is_file() else {}
    return HealthConfig(**table)


def ranges(cfg: HealthConfig, series: dict[int, dict]) -> dict[str, tuple[float, float]]:
    start = series.get(0, {})
    return {name: allowed_range(name, cfg.limits, start.get(name)) for name in STATISTICS}


def is_out(value: float | None, bounds: tuple[float, float]) -> bool:
    return value is None or not bounds[0] <= value <= bounds[1]  # None: logged as null, i.e. NaN or inf


def print_table(series: dict[int, dict], bounds: dict[str, tuple[float, float]], watch: list[str]) -> None:
    names = [n for n in STATISTICS if any(n in row for row in series.values())]
    print(f"{'step':>7}" + "".join(f"{n:>19}" for n in names))
    for step, row in series.items():
        cells = []
        for n in names:
            v = row.get(n, math.nan) if n in row else math.nan
            flag = "*" if n in row and n in watch and is_out(row[n], bounds[n]) else " "
            cells.append(f"{'nan' if v is None else f'{v:.4g}':>18}{flag}")
        print(f"{step:>7}" + "".join(cells))
    print("range  " + "".join(f"{fmt_range(bounds[n]):>19}" for n in names))


def fmt_range(bounds: tuple[float, float]) -> str:
    low, high = bounds
    return f"<= {high:.3g}" if low == -math.inf else f"[{low:.3g}, {high:.3g}]"


def plot(series: dict[int, dict], bounds: dict[str, tuple[float, float]], watch: list[str], out: Path) -> None:
    names = [n for n in STATISTICS if any(n in row for row in series.values())]
    cols, rows = 2, math.ceil(len(names) / 2)
    image = Image.new("RGB", (cols * PANEL_W, max(rows, 1) * PANEL_H), "white")
    draw = ImageDraw.Draw(image)
    steps = list(series)
    for i, name in enumerate(names):
        x0, y0 = (i % cols) * PANEL_W, (i // cols) * PANEL_H
        log = STATISTICS[name][1] == "ratio"
        points = [(s, series[s][name]) for s in steps if name in series[s]]
        finite = [v for _, v in points if v is not None and math.isfinite(v) and (v > 0 or not log)]
        low, high = bounds[name]
        shown = [v for v in (*finite, low, high) if math.isfinite(v) and (v > 0 or not log)]
        f = (lambda v: math.log10(v)) if log else (lambda v: v)  # noqa: E731
        lo, hi = min(map(f, shown)), max(map(f, shown))
        pad = 0.08 * (hi - lo or 1.0)
        lo, hi = lo - pad, hi + pad
        s_lo, s_hi = min(steps), max(max(steps), min(steps) + 1)

        xy = functools.partial(to_pixel, (x0, y0), (s_lo, s_hi), (lo, hi), f)
        top = xy(s_lo, high)[1] if math.isfinite(high) else y0 + MARGIN / 2
        bottom = xy(s_lo, low)[1] if math.isfinite(low) and (low > 0 or not log) else y0 + PANEL_H - MARGIN
        left, right = x0 + MARGIN, x0 + PANEL_W - MARGIN / 2
        draw.rectangle([left, max(top, y0 + MARGIN / 2), right, min(bottom, y0 + PANEL_H - MARGIN)], fill=(221, 242, 221))
        draw.rectangle([left, y0 + MARGIN / 2, right, y0 + PANEL_H - MARGIN], outline="black")
        line = [xy(s, v) for s, v in points if v is not None and math.isfinite(v) and (v > 0 or not log)]
        if len(line) > 1:
            draw.line(line, fill=(40, 90, 200), width=2)
        for s, v in points:
            bad = name in watch and is_out(v, bounds[name])
            if v is None or not math.isfinite(v) or (log and v <= 0):
                px, py = xy(s, 10**hi if log else hi)  # not plottable: a red mark on the top edge
            else:
                px, py = xy(s, v)
            colour = (210, 30, 30) if bad else (40, 90, 200)
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        title = f"{name}{'' if name in watch else ' (not watched)'}  range {fmt_range(bounds[name])}"
        draw.text((left, y0 + 6), title, fill="black")
        draw.text((left, y0 + PANEL_H - MARGIN + 4), f"step {s_lo}", fill="black")
        draw.text((right - 60, y0 + PANEL_H - MARGIN + 4), f"step {s_hi}", fill="black")
        for value in (lo, hi):
            label = f"{10**value if log else value:.3g}"
            draw.text((x0 + 4, xy(s_lo, 10**value if log else value)[1] - 6), label, fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)


def to_pixel(corner: tuple[int, int], steps: tuple[int, int], values: tuple[float, float], f, step: float,
             value: float) -> tuple[float, float]:
    """Image coordinates of (step, value) in the panel at `corner`, whose axes span `steps` and f(value) `values`."""
    px = corner[0] + MARGIN + (step - steps[0]) / (steps[1] - steps[0]) * (PANEL_W - 1.5 * MARGIN)
    py = corner[1] + PANEL_H - MARGIN - (f(value) - values[0]) / (values[1] - values[0]) * (PANEL_H - 1.5 * MARGIN)
    return px, py


def main(argv: list[str]) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="a recipe's run directory (metrics.jsonl, config.toml)")
    parser.add_argument("--png", type=Path, default=None, help="where to write the plot (default: RUN_DIR/health.png)")
    args = parser.parse_args(argv)
    series = read_series(args.run_dir)
    if not series:
        raise SystemExit(f"{args.run_dir / 'metrics.jsonl'} has no health/* values: was [health] action = 'off'?")
    cfg = read_config(args.run_dir)
    bounds = ranges(cfg, series)
    print_table(series, bounds, cfg.watch)
    link = args.run_dir / "ckpt" / "last_healthy"
    print(f"last healthy checkpoint: {link} -> {os.readlink(link)}" if link.is_symlink() else "no last_healthy yet")
    out = args.png or args.run_dir / "health.png"
    plot(series, bounds, cfg.watch, out)
    print(f"plot: {out}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
