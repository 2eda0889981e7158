"""Download a model or dataset snapshot from the Hugging Face Hub (`huggingface_hub.snapshot_download`).

    python tools/download_hf.py --repo Wan-AI/Wan2.1-T2V-1.3B-Diffusers          # -> weights/Wan2.1-T2V-1.3B-Diffusers
    python tools/download_hf.py --repo FastVideo/Wan-Syn_77x448x832_600k --repo-type dataset
                                                                   # -> datasets/Wan-Syn_77x448x832_600k
    python tools/download_hf.py --examples      # print the commands for every checkpoint and dataset we use

Models go to weights/<name>, datasets to datasets/<name> unless `--local-dir` says otherwise. An interrupted download
resumes when the same command is run again (finished files are kept, partial ones continue). `--allow-patterns`
(repeatable) limits the download, e.g. `--allow-patterns "vae/*" --allow-patterns "text_encoder/*"`. `--hub-dir DIR`
reads `DIR/<owner>/<name>` instead of the Hub (an offline stand-in, as the tests use). A recipe's whole set of inputs
(checkpoint, data, negative prompt, validation prompts) comes from one command: tools/prepare.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data.hub import KNOWN_REPOS, fetch, local_dir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", help="owner/name on the Hub")
    p.add_argument("--repo-type", choices=["model", "dataset"], default="model")
    p.add_argument("--local-dir", help="destination folder (default: weights/<name> or datasets/<name>)")
    p.add_argument("--allow-patterns", action="append", help="glob of files to fetch; repeatable (default: all)")
    p.add_argument("--revision", help="branch, tag or commit (default: main)")
    p.add_argument("--hub-dir", type=Path, help="read repos from DIR/<owner>/<name> instead of the Hub (offline)")
    p.add_argument("--examples", action="store_true", help="print example commands and exit")
    args = p.parse_args(argv)
    if not args.examples and not args.repo:
        p.error("--repo is required (or --examples)")
    return args


def print_examples() -> None:
    for repo, (repo_type, what) in KNOWN_REPOS.items():
        kind = " --repo-type dataset" if repo_type == "dataset" else ""
        print(f"# {what}\npython tools/download_hf.py --repo {repo}{kind}   # -> {local_dir(repo, repo_type)}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.examples:
        print_examples()
        return
    local = Path(args.local_dir) if args.local_dir else local_dir(args.repo, args.repo_type)
    path = fetch(
        args.repo,
        args.repo_type,
        local,
        hub_dir=args.hub_dir,
        allow_patterns=args.allow_patterns,
        revision=args.revision,
    )
    print(f"downloaded {args.repo} ({args.repo_type}) to {path}")


if __name__ == "__main__":
    try:
        main()
    except ConnectionError as e:
        sys.exit(f"error: {e}")
