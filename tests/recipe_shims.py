"""Test-only stand-ins that make a recipe's randomness independent of how a global batch is split.

The recipes draw noise, timesteps and rollout steps for a whole (micro-)batch from one generator per DP rank, so
batch 2 in one call, two micro-batches of 1 (grad accumulation) and two DP ranks of 1 consume the stream differently
and see different noise: the runs differ although the math says they are the same. `LayoutFreeRandom` replaces the
`torch` module seen by the recipe and by losses/ (dmd.py, flow.py): every draw that passes a generator is made one
sample at a time from a stream of its own per call site, seeded identically in every process, and a DP rank keeps its
rows of the draw for the whole global batch. As each recipe phase (student step, critic step) walks its micro-batches
in order, sample i of the global batch gets the same numbers in every layout. The rollout's step index is drawn once
per call, not per sample, so layout tests use a one-step schedule (`dmd.steps=[757]`).

(The DMD normaliser is per sample in losses/dmd.py, so batch 2 is the mean of two batches of 1, as accumulation and
two ranks compute it.)

    python -m torch.distributed.run --nproc_per_node 2 tests/recipe_shims.py recipes/<recipe>.py [overrides...]
runs a recipe (any with `RecipeConfig` and `main(cfg)`: the Wan recipes, toy_teacher.py) with `LayoutFreeRandom`
installed (for multi-rank comparisons) and its validation samples not decoded (the tiny VAE's decode is most of a tiny
run's CPU time; tests/test_recipes.py checks the samples).
"""

from __future__ import annotations

import importlib.util
import sys
import zlib
from pathlib import Path
from types import ModuleType

import torch
import torch.distributed as dist



class LayoutFreeRandom:
    """Stands in for the `torch` module: rand / randn / randint with a generator come from per-call-site, per-sample
    streams; everything else is torch's own. Assumes sp = 1 (a rank is a DP rank)."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.streams: dict[str, torch.Generator] = {}

    def __getattr__(self, name: str):
        return getattr(torch, name)

    def _rows(self, draw, size: tuple[int, ...]) -> torch.Tensor:
        caller = sys._getframe(2)  # the line in the recipe or losses/ that asked for the numbers
        site = f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno}"
        if site not in self.streams:
            self.streams[site] = torch.Generator().manual_seed(self.seed + zlib.crc32(site.encode()))
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        batch, rest = size[0], tuple(size[1:])
        rows = [draw((1, *rest), self.streams[site]) for _ in range(world * batch)]  # the whole global batch
        return torch.cat(rows[rank * batch : (rank + 1) * batch])

    def randn(self, *size, generator=None, device=None, dtype=None, **kwargs) -> torch.Tensor:
        size = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else size
        if generator is None:
            return torch.randn(size, device=device, dtype=dtype, **kwargs)
        out = self._rows(lambda shape, g: torch.randn(shape, generator=g, dtype=dtype), size)
        return out.to(device)

    def rand(self, *size, generator=None, device=None, dtype=None, **kwargs) -> torch.Tensor:
        size = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else size
        if generator is None:
            return torch.rand(size, device=device, dtype=dtype, **kwargs)
        out = self._rows(lambda shape, g: torch.rand(shape, generator=g, dtype=dtype), size)
        return out.to(device)

    def randint(self, *args, generator=None, device=None, **kwargs) -> torch.Tensor:
        *bounds, size = args  # randint(high, size) or randint(low, high, size)
        if generator is None:
            return torch.randint(*bounds, size, device=device, **kwargs)
        out = self._rows(lambda shape, g: torch.randint(*bounds, shape, generator=g, **kwargs), tuple(size))
        return out.to(device)


def install_layout_free_random(recipe: ModuleType, setattr_=setattr) -> LayoutFreeRandom:
    """Point the recipe's and losses/' `torch` at one LayoutFreeRandom (`setattr_`: pytest's monkeypatch.setattr to
    undo it after a test)."""
    import losses.dmd
    import losses.flow

    proxy = LayoutFreeRandom()
    for module in (recipe, losses.dmd, losses.flow):
        setattr_(module, "torch", proxy)
    return proxy


def load_recipe(path: str | Path) -> ModuleType:
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    from components.config import load_config

    recipe = load_recipe(sys.argv[1])
    install_layout_free_random(recipe)
    recipe.save_samples = lambda *args: None
    recipe.main(load_config(recipe.RecipeConfig, sys.argv[2:], default_toml=Path(recipe.__file__).with_suffix(".toml")))
