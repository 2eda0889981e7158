"""A tiny diffusers-layout Wan pipeline folder built offline, for CPU tests of tools that load `--model DIR`.

    path = build_tiny_pipeline(tmp_path / "pipe")                       # tokenizer/, text_encoder/, vae/, scheduler/
    path = build_tiny_pipeline(tmp_path / "pipe", transformer_config={...})   # + transformer/ (WanTransformer3DModel)

Sizes match `WAN_CONFIGS["tiny"]`: VAE z_dim 4 (latents_mean/std non-trivial so normalisation is exercised), 8× spatial
and 4× temporal compression like Wan2.1; UMT5 d_model 32 (= tiny text_dim). Weights are random (seeded).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

TINY_Z_DIM = 4
TINY_TEXT_DIM = 32
WORDS = (
    "a the of and in on with at to is are red blue green small big cat dog bird car tree sky sea city street "
    "walks runs flies drives sits stands video clip scene slow fast camera pan zoom day night sun rain snow "
    "blurry low quality static worst bad ugly"
).split()


def build_tokenizer(out: Path) -> None:
    """A word-level tokenizer with T5's special ids (<pad>=0, </s>=1, <unk>=2) that appends </s> like T5."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(WORDS))}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512, padding_side="right")
    fast.save_pretrained(out)


def build_tiny_pipeline(out_dir: str | Path, transformer_config: dict[str, Any] | None = None,
                        z_dim: int = TINY_Z_DIM, text_dim: int = TINY_TEXT_DIM, seed: int = 0) -> Path:
    """Write tokenizer/, text_encoder/ (UMT5), vae/ (AutoencoderKLWan), scheduler/, model_index.json and, when
    `transformer_config` is given, transformer/ (`WanTransformer3DModel(**transformer_config)`). Returns the folder."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    build_tokenizer(out / "tokenizer")
    cfg = UMT5Config(vocab_size=len(WORDS) + 3, d_model=text_dim, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
                     pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    UMT5EncoderModel(cfg).eval().save_pretrained(out / "text_encoder")
    vae = AutoencoderKLWan(base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           temperal_downsample=[False, True, True],
                           latents_mean=[0.1 * (i - z_dim / 2) for i in range(z_dim)],
                           latents_std=[0.5 + 0.25 * i for i in range(z_dim)])
    vae.save_pretrained(out / "vae")
    UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0).save_pretrained(
        out / "scheduler")
    index = {
        "_class_name": "WanPipeline",
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "transformer": [None, None],
    }
    if transformer_config is not None:
        WanTransformer3DModel(**transformer_config).save_pretrained(out / "transformer")
        index["transformer"] = ["diffusers", "WanTransformer3DModel"]
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out
