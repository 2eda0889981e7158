"""Download a model or dataset snapshot from the Hugging Face Hub (`huggingface_hub.snapshot_download`).

    python tools/download_hf.py --repo Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir data/Wan2.1-T2V-1.3B-Diffusers
    python tools/download_hf.py --repo FastVideo/Wan-Syn_77x448x832_600k --repo-type dataset \
        --local-dir data/Wan-Syn_77x448x832_600k
    python tools/download_hf.py --examples      # print the commands for every checkpoint and dataset we use

An interrupted download resumes when the same command is run again (finished files are kept, partial ones continue).
`--allow-patterns` (repeatable) limits the download, e.g. `--allow-patterns "vae/*" --allow-patterns "text_encoder/*"`.
"""

from __future__ import annotations

import argparse

from huggingface_hub import snapshot_download

EXAMPLES = [  # (repo, repo type, what it is)
    ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "model", "Wan2.1 T2V 1.3B base (teacher / critic / student init)"),
    ("Wan-AI/Wan2.1-T2V-14B-Diffusers", "model", "Wan2.1 T2V 14B base"),
    ("Wan-AI/Wan2.2-TI2V-5B-Diffusers", "model", "Wan2.2 TI2V 5B base (VAE z 48)"),
    ("FastVideo/FastWan2.1-T2V-1.3B-Diffusers", "model", "released Sparse-distill 1.3B student"),
    ("FastVideo/FastWan2.1-T2V-14B-480P-Diffusers", "model", "released Sparse-distill 14B 480P student"),
    ("FastVideo/FastWan2.2-TI2V-5B-FullAttn-Diffusers", "model", "released DMD 5B student (dense attention)"),
    ("FastVideo/Wan-Syn_77x448x832_600k", "dataset", "600k synthetic latents, 77x448x832, Wan2.1 VAE"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", help="owner/name on the Hub")
    p.add_argument("--repo-type", choices=["model", "dataset"], default="model")
    p.add_argument("--local-dir", help="destination folder (default: data/<name>)")
    p.add_argument("--allow-patterns", action="append", help="glob of files to fetch; repeatable (default: all)")
    p.add_argument("--revision", help="branch, tag or commit (default: main)")
    p.add_argument("--examples", action="store_true", help="print example commands and exit")
    args = p.parse_args(argv)
    if not args.examples and not args.repo:
        p.error("--repo is required (or --examples)")
    return args


def print_examples() -> None:
    for repo, repo_type, what in EXAMPLES:
        kind = " --repo-type dataset" if repo_type == "dataset" else ""
        print(f"# {what}\npython tools/download_hf.py --repo {repo}{kind} --local-dir data/{repo.split('/')[1]}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.examples:
        print_examples()
        return
    local_dir = args.local_dir or f"data/{args.repo.split('/')[-1]}"
    path = snapshot_download(repo_id=args.repo, repo_type=args.repo_type, local_dir=local_dir,
                             allow_patterns=args.allow_patterns, revision=args.revision)
    print(f"downloaded {args.repo} ({args.repo_type}) to {path}")


if __name__ == "__main__":
    main()
