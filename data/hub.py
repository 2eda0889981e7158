"""Hugging Face Hub downloads: the checkpoints and datasets the recipes use, where they go, and an offline stand-in.

    repo_id, repo_type = known_repo(Path("weights/Wan2.1-T2V-1.3B-Diffusers"))   # by folder name
    fetch("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "model", local_dir("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "model"))
    fetch(repo_id, repo_type, folder, hub_dir=Path("tiny_hub"))   # copies tiny_hub/<owner>/<name> instead

Checkpoints go to `weights/<name>`, datasets to `datasets/<name>` (neither inside a Python package). `hub_dir` is the
one place where a hub id can resolve to a local folder `<hub_dir>/<owner>/<name>`: tests walk the real download code
path offline with tiny stand-ins there.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from pathlib import Path

# repo id -> (repo type, what it is)
KNOWN_REPOS = {
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": ("model", "Wan2.1 T2V 1.3B base (teacher / critic / student init)"),
    "Wan-AI/Wan2.1-T2V-14B-Diffusers": ("model", "Wan2.1 T2V 14B base"),
    "Wan-AI/Wan2.2-TI2V-5B-Diffusers": ("model", "Wan2.2 TI2V 5B base (VAE z 48)"),
    "Wan-AI/Wan2.2-T2V-A14B-Diffusers": ("model", "Wan2.2 T2V A14B base: two 14B experts (high, low noise)"),
    "Wan-AI/Wan2.2-I2V-A14B-Diffusers": ("model", "Wan2.2 I2V A14B base: two 14B experts (high, low noise)"),
    "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers": ("model", "Wan2.1 I2V 14B 480P base (+ CLIP image encoder)"),
    "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers": ("model", "Wan2.1 I2V 14B 720P base (+ CLIP image encoder)"),
    "FastVideo/FastWan2.1-T2V-1.3B-Diffusers": ("model", "released Sparse-distill 1.3B student"),
    "FastVideo/FastWan2.1-T2V-14B-480P-Diffusers": ("model", "released Sparse-distill 14B 480P student"),
    "FastVideo/FastWan2.2-TI2V-5B-FullAttn-Diffusers": ("model", "released DMD 5B student (dense attention)"),
    "FastVideo/Wan-Syn_77x448x832_600k": ("dataset", "600k synthetic latents, 77x448x832, Wan2.1 VAE"),
}
ROOTS = {"model": Path("weights"), "dataset": Path("datasets")}
DONE = ".download_complete"  # written into a folder once a whole repo is in it: a rerun needs no network


def local_dir(repo_id: str, repo_type: str) -> Path:
    """Where a hub repo is kept: weights/<name> for models, datasets/<name> for datasets (relative to the repo root)."""
    return ROOTS[repo_type] / repo_id.split("/")[-1]


def known_repo(folder: Path) -> tuple[str, str] | None:
    """(repo id, repo type) of the known repo whose name is `folder`'s name, or None."""
    for repo_id, (repo_type, _) in KNOWN_REPOS.items():
        if repo_id.split("/")[-1] == Path(folder).name:
            return repo_id, repo_type
    return None


def fetch(
    repo_id: str,
    repo_type: str,
    local: Path,
    *,
    hub_dir: Path | None = None,
    allow_patterns: list[str] | None = None,
    revision: str | None = None,
) -> Path:
    """Download `repo_id` into `local` with progress bars; an interrupted download resumes when called again. A repo
    that cannot be had now (offline, unknown, gated) is a ConnectionError with one line of reason.

    With `hub_dir`, the repo is `<hub_dir>/<owner>/<name>` on disk and its files are copied (same patterns). A whole
    repo (no `allow_patterns`) marks the folder as complete (`is_complete`).
    """
    if hub_dir is not None:
        path = copy_from_local_hub(Path(hub_dir) / repo_id, Path(local), allow_patterns)
    else:
        import huggingface_hub  # looked up at call time, so tests can stand in for it
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        if Path(local).is_dir() and any(Path(local).iterdir()):
            # snapshot_download quietly returns a non-empty folder as it is when the Hub is unreachable: check first,
            # so a partial folder is never marked complete.
            try:
                huggingface_hub.HfApi().repo_info(repo_id, repo_type=repo_type, revision=revision)
            except Exception as e:  # offline, unknown repo, gated: all mean "not downloaded now"
                raise ConnectionError(f"cannot reach {repo_id} on the Hub to finish {local}: {e}") from None
        try:
            path = huggingface_hub.snapshot_download(
                repo_id=repo_id,
                repo_type=repo_type,
                local_dir=str(local),
                allow_patterns=allow_patterns,
                revision=revision,
            )
        except (HfHubHTTPError, LocalEntryNotFoundError) as e:  # offline, unknown, private or gated repo
            raise ConnectionError(f"cannot download {repo_id} ({repo_type}): {str(e).splitlines()[0]}") from None
    if allow_patterns is None:
        Path(local).mkdir(parents=True, exist_ok=True)
        (Path(local) / DONE).write_text(f"{repo_id}\n")
    return Path(path)


def is_complete(local: Path) -> bool:
    """Whether a whole repo was fetched into `local` (an interrupted download leaves no mark)."""
    return (Path(local) / DONE).is_file()


def copy_from_local_hub(source: Path, local: Path, allow_patterns: list[str] | None) -> Path:
    """Copy the files of a local stand-in repo that match `allow_patterns` (all when None); existing files are kept."""
    from tqdm import tqdm

    if not source.is_dir():
        raise ConnectionError(f"{source} does not exist (the local hub holds <owner>/<name> folders)")
    names = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
    if allow_patterns is not None:
        names = [n for n in names if any(fnmatch.fnmatch(n, pattern) for pattern in allow_patterns)]
    for name in tqdm(names, desc=f"copy {source.name}", unit="file"):
        target = local / name
        if not target.exists():  # copied under a temp name, so an interrupted copy never looks finished
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, target.with_name(target.name + ".part"))
            os.replace(target.with_name(target.name + ".part"), target)
    return local
