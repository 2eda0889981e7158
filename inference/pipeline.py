"""VideoPipeline: the Python API for sampling videos from a Wan checkpoint (what tools/sample.py runs).

    from inference import VideoPipeline
    pipe = VideoPipeline.from_pretrained("FastVideo/FastWan2.1-T2V-1.3B-Diffusers", device="cuda", fp8=True,
                                         compile=True)
    video = pipe("a cat walks on the grass", seed=1024)                # uint8 (81, 480, 832, 3), 3 DMD steps, VSA
    video = pipe("a cat walks on the grass", teacher=True, guidance=3.0, shift=3.0)   # 50-step dense CFG (UniPC)
    pipe = VideoPipeline.from_pretrained("FastVideo/FastWan2.2-TI2V-5B-FullAttn-Diffusers", device="cuda")
    video = pipe("a cat walks on the grass", image="cat.png")          # TI2V: the image is the first frame
    pipe = VideoPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", lora="outputs/RUN/export_lora")  # LoRA
    pipe = VideoPipeline.from_pretrained("Wan-AI/Wan2.2-I2V-A14B-Diffusers", device="cuda")   # two experts
    video = pipe("a cat walks on the grass", image="cat.png", teacher=True, teacher_steps=40, guidance=3.5)

Wan2.2-A14B folders hold two experts, transformer/ (high noise) and transformer_2/ (low noise), and `boundary_ratio`
in model_index.json: the teacher runs transformer/ for t >= boundary_ratio * 1000 with `guidance` and transformer_2/
below with `guidance_2` (default: guidance), as diffusers' WanPipeline does. A distilled student of a two-expert
teacher is one transformer (transformer/, no transformer_2/): it runs all its few steps; a student folder that does
keep two experts switches at the same boundary. I2V checkpoints (transformer in_channels = 2 z_dim + 4) need `image`:
it is resized (aspect kept: a different aspect ratio is an error) and VAE-encoded as frame 0 of an otherwise black
video, with a first-frame mask, and concatenated to the noise; Wan2.1-I2V also encodes it with the folder's CLIP
image_encoder/ (penultimate hidden states, 257 tokens), as diffusers' WanImageToVideoPipeline does. A LoRA adapter on a
two-expert folder is a one-transformer student: it is merged into the expert whose weights digest it records, and the
other expert is not loaded.

`from_pretrained` takes a diffusers pipeline folder (transformer/, vae/, text_encoder/, tokenizer/) or a hub id: it
checks the config files first (a hub id downloads those alone), so bad input fails before any weights move. The
constructor takes components already built (a DiT, optionally a VAE and a tokenizer + text encoder), e.g. random
weights for benchmarks; `denoise(context, ...)` then samples from precomputed text embeddings. Samplers:
inference/samplers.py; the DiT is readied by `prepare_for_inference` (FP8, fused row kernels, compile).
"""

from __future__ import annotations

import gc
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.distributed as dist
from torch import nn

from attention.sdpa import sdpa_attention
from attention.vsa import vsa_attention, vsa_fp8_attention, vsa_meta
from data.encode import (
    NEGATIVE_PROMPTS,
    denormalize_latents,
    encode_prompts,
    latent_stats,
    load_text_encoder,
    load_vae,
    normalize_latents,
    vae_encode,
)
from inference.fp8 import fp8_device_problem
from inference.lora import (
    LoraFiles,
    check_base_digest,
    check_lora_fits,
    check_scale,
    checkpoint_digest,
    load_lora,
    read_lora,
)
from inference.parallel import (
    apply_sequence_parallel,
    broadcast_from_first,
    check_same_request,
    check_sampling_sizes,
    check_token_grid,
    sampling_groups,
)
from inference.prepare import prepare_for_inference
from inference.samplers import denoise_student, denoise_teacher, model_input_shape
from inference.timer import StageTimer
from losses.flow import DMD_STEPS
from models.wan import WanConfig, WanModel
from models.wan_weights import load_pretrained

AttnFn = Callable[..., torch.Tensor]
ImageInput = Any  # a file path (str / Path) or a PIL image

# Defaults per VAE latent width (z_dim 16: Wan2.1; 48: Wan2.2 TI2V-5B, whose FastWan release is full attention).
DEFAULTS: dict[int, dict[str, Any]] = {
    16: {"height": 480, "width": 832, "num_frames": 81, "fps": 16, "vae_ratio": 8, "attn": "vsa"},
    48: {"height": 704, "width": 1280, "num_frames": 121, "fps": 24, "vae_ratio": 16, "attn": "sdpa"},
}
# Wan's English default negative prompt (the unconditional branch of teacher CFG), shared with tools/prepare.py.
NEGATIVE_PROMPT = NEGATIVE_PROMPTS["en"]
ATTN: dict[str, AttnFn] = {"sdpa": sdpa_attention, "vsa": vsa_attention, "vsa_fp8": vsa_fp8_attention}
STUDENT_STEPS = tuple(float(t) for t in DMD_STEPS)  # 1000, 757, 522
# Fetched first to validate the request (configs and tokenizer, no weights), then the rest.
HUB_CONFIGS = ["model_index.json", "transformer/config.json", "transformer_2/config.json", "vae/config.json",
               "text_encoder/config.json", "image_encoder/config.json", "image_processor/*", "tokenizer/*"]
HUB_FILES = ["model_index.json", "transformer/*", "transformer_2/*", "vae/*", "text_encoder/*", "image_encoder/*",
             "image_processor/*", "tokenizer/*"]
VAE_TEMPORAL_RATIO = 4
I2V_MASK_CHANNELS = 4  # the first-frame mask, one channel per pixel frame a latent frame covers
ASPECT_TOLERANCE = 0.02  # an image within 2 % of the video's aspect ratio is resized; beyond, cropping would cut it


class InputError(ValueError):
    """Bad input (model, sizes, steps, device), reported before any weights load or any sampling starts."""


# ---------------------------------------------------------------- what a pipeline's config files fix

class VideoSize(NamedTuple):
    height: int
    width: int
    num_frames: int
    latent_shape: tuple[int, int, int, int, int]  # (1, C, T, H, W)


@dataclass(frozen=True)
class VideoSpec:
    """The sizes a Wan pipeline accepts: latent channels, VAE spatial ratio, the DiT's spatial patch, its image
    conditioning (TI2V frame 0, or I2V mask + latent with or without CLIP) and its experts."""

    z_dim: int
    vae_ratio: int
    patch: tuple[int, int]  # (h, w)
    ti2v: bool
    i2v: bool = False  # transformer in_channels = z_dim + 4 + z_dim: an image is required
    clip: bool = False  # Wan2.1-I2V: CLIP image tokens through image_encoder/
    experts: int = 1  # 2: transformer/ + transformer_2/ (Wan2.2-A14B)
    boundary: float | None = None  # boundary_ratio * 1000 from model_index.json

    @property
    def defaults(self) -> dict[str, Any]:
        return DEFAULTS.get(self.z_dim, {})

    def size(self, height: int | None, width: int | None, num_frames: int | None) -> VideoSize:
        """Sizes (None: this model's default) checked against the VAE and the patch, and the latent shape."""
        sizes = {"height": height, "width": width, "num_frames": num_frames}
        for name, value in sizes.items():
            sizes[name] = self.defaults.get(name) if value is None else value
            if sizes[name] is None:
                raise InputError(f"no default {name} for a VAE with z_dim {self.z_dim}; pass it")
        for name, patch in zip(("height", "width"), self.patch):
            multiple = self.vae_ratio * patch
            if sizes[name] <= 0 or sizes[name] % multiple:
                raise InputError(f"{name} {sizes[name]} must be a positive multiple of {multiple} for this model "
                                 f"(VAE spatial ratio {self.vae_ratio} x patch {patch})")
        frames = sizes["num_frames"]
        if frames < 1 or (frames - 1) % VAE_TEMPORAL_RATIO:
            raise InputError(f"num_frames {frames} must be = 1 mod {VAE_TEMPORAL_RATIO} (e.g. 81 or 121): the Wan VAE "
                             "keeps the first frame and compresses the rest 4x in time")
        latent_shape = (1, self.z_dim, (frames - 1) // VAE_TEMPORAL_RATIO + 1, sizes["height"] // self.vae_ratio,
                        sizes["width"] // self.vae_ratio)
        return VideoSize(sizes["height"], sizes["width"], frames, latent_shape)

    def check_sampling(self, steps: Sequence[float], sparsity: float, teacher: bool, teacher_steps: int,
                       image: ImageInput | None, size: VideoSize | None = None) -> None:
        """The sampler's arguments, before any text encoding or denoising (and, given `size`, the image's aspect)."""
        steps = list(steps)
        if not steps or not all(0 < s <= 1000 for s in steps) or any(a <= b for a, b in zip(steps, steps[1:])):
            raise InputError(f"steps {steps} must be strictly decreasing timesteps in (0, 1000], e.g. 1000,757,522")
        if not 0.0 <= sparsity < 1.0:
            raise InputError(f"sparsity {sparsity} must be in [0, 1) (fraction of key tiles skipped)")
        if teacher and teacher_steps < 1:
            raise InputError(f"teacher_steps {teacher_steps} must be >= 1")
        if teacher and self.boundary is not None and self.experts < 2:
            raise InputError(f"this pipeline's model_index.json sets boundary_ratio {self.boundary / 1000:g} (a "
                             "two-expert Wan2.2-A14B teacher) but it has no transformer_2/ (the low-noise expert): "
                             "teacher sampling needs both; use the full Wan2.2-A14B folder (a distilled one-"
                             "transformer student samples without --teacher)")
        if image is None:
            if self.i2v:
                raise InputError(f"this is an image-to-video checkpoint (transformer in_channels "
                                 f"{2 * self.z_dim + I2V_MASK_CHANNELS} = {self.z_dim} noise + {I2V_MASK_CHANNELS} "
                                 f"mask + {self.z_dim} image latent): pass the first frame with --image PATH "
                                 "(image=... in Python)")
            return
        if not (self.ti2v or self.i2v):
            raise InputError(f"image conditioning needs a TI2V model (Wan2.2 TI2V-5B: VAE z_dim 48 / "
                             f"expand_timesteps) or an I2V one (transformer in_channels {2 * self.z_dim + 4}); "
                             f"this one is text-to-video only (VAE z_dim {self.z_dim})")
        if isinstance(image, (str, Path)) and not Path(image).is_file():
            raise InputError(f"image {str(image)!r} is not a file")
        if size is not None and self.i2v:  # TI2V keeps its cover-and-crop (tests/test_sample_sp.py relies on it)
            check_image_aspect(image, size.height, size.width)


def check_image_aspect(image: ImageInput, height: int, width: int) -> None:
    """I2V images are resized to the video size; one whose aspect ratio differs would lose a band to the crop (or be
    stretched, as diffusers' pipeline does): refused, naming the sizes. Reads the image header only."""
    from PIL import Image, UnidentifiedImageError

    try:
        img_w, img_h = image.size if isinstance(image, Image.Image) else Image.open(image).size
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"image {str(image)!r} could not be read as an image: {e}") from None
    if abs((img_w / img_h) / (width / height) - 1) > ASPECT_TOLERANCE:
        raise InputError(f"image is {img_w}x{img_h} (WxH, aspect {img_w / img_h:.3f}) but the video is {width}x"
                         f"{height} (aspect {width / height:.3f}): crop the image to the video's aspect, or pass "
                         f"--width/--height with the image's aspect (multiples of the VAE ratio x patch); images of "
                         f"the video's aspect are resized to {width}x{height}")


@dataclass(frozen=True)
class PipelineFiles:
    """A diffusers Wan pipeline located and its config files checked; weights not yet read (nor downloaded)."""

    name: str  # as the user gave it
    folder: Path | None  # None for a hub id until `download`
    hub_id: str | None
    spec: VideoSpec
    num_heads: int  # the DiT's attention heads: sequence parallel splits them

    def download(self) -> Path:
        """The local folder with every component (a hub id: downloaded, or reused from the HF cache)."""
        return self.folder if self.folder is not None else fetch(self.hub_id, HUB_FILES)


def inspect_pipeline(model: str | Path) -> PipelineFiles:
    """Locate a pipeline folder or hub id and check its config files agree; raise InputError naming the first bad
    one. A hub id downloads only the config files and the tokenizer here."""
    folder, hub_id = locate_model(str(model))
    configs = read_configs(folder if folder is not None else fetch(hub_id, HUB_CONFIGS), str(model))
    dit, vae, text, index = configs["transformer"], configs["vae"], configs["text_encoder"], configs["model_index"]
    z_dim = int(vae.get("z_dim", 16))
    i2v = dit.get("in_channels") == 2 * z_dim + I2V_MASK_CHANNELS
    if dit.get("in_channels") != z_dim and not i2v:
        raise InputError(f"{model}: transformer in_channels={dit.get('in_channels')} is neither vae z_dim={z_dim} "
                         f"(T2V/TI2V) nor 2 z_dim + {I2V_MASK_CHANNELS} = {2 * z_dim + I2V_MASK_CHANNELS} (I2V)")
    clip = dit.get("image_dim") is not None
    if clip and "image_encoder" not in configs:
        raise InputError(f"{model}: the transformer takes CLIP image tokens (image_dim={dit['image_dim']}, "
                         "Wan2.1-I2V) but the folder has no image_encoder/config.json and image_processor/")
    boundary_ratio = index.get("boundary_ratio")
    if "transformer_2" in configs:
        if boundary_ratio is None:
            raise InputError(f"{model}: has transformer_2/ but model_index.json sets no boundary_ratio (the timestep "
                             "fraction where the low-noise expert takes over, 0.875 for Wan2.2-T2V-A14B)")
        differ = sorted(k for k in set(dit) | set(configs["transformer_2"]) if not k.startswith("_")
                        and dit.get(k) != configs["transformer_2"].get(k))
        if differ:
            raise InputError(f"{model}: transformer/ and transformer_2/ configs differ in {differ}; the two experts "
                             "of a Wan2.2-A14B pipeline share one architecture")
    if boundary_ratio is not None and not 0 < float(boundary_ratio) < 1:
        raise InputError(f"{model}: model_index.json boundary_ratio {boundary_ratio} must be in (0, 1)")
    if dit.get("text_dim", 4096) != text.get("d_model"):
        raise InputError(f"{model}: transformer text_dim={dit.get('text_dim')} != text encoder "
                         f"d_model={text.get('d_model')}")
    vae_ratio = int(vae.get("scale_factor_spatial") or DEFAULTS.get(z_dim, {}).get("vae_ratio") or 0)
    if vae_ratio <= 0:
        raise InputError(f"{model}: vae config has no scale_factor_spatial and z_dim {z_dim} is unknown")
    _, patch_h, patch_w = dit.get("patch_size", (1, 2, 2))
    ti2v = bool(index.get("expand_timesteps", z_dim == 48))
    spec = VideoSpec(z_dim, vae_ratio, (patch_h, patch_w), ti2v, i2v=i2v, clip=clip,
                     experts=2 if "transformer_2" in configs else 1,
                     boundary=None if boundary_ratio is None else float(boundary_ratio) * 1000)
    return PipelineFiles(str(model), folder, hub_id, spec, int(dit.get("num_attention_heads", 0)))


def locate_model(model: str) -> tuple[Path | None, str | None]:
    """(local folder, None) or (None, hub id); a path that exists wins over a hub id of the same spelling."""
    path = Path(model)
    if path.exists():
        return path, None
    if re.fullmatch(r"[\w.-]+/[\w.-]+", model) and not model.startswith("."):
        return None, model
    raise InputError(f"model {model!r}: folder does not exist (and it is not a hub id of the form owner/name)")


def fetch(hub_id: str, patterns: list[str]) -> Path:
    """Download (or reuse from the HF cache) the files matching `patterns` of a hub repo, with progress bars."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(hub_id, allow_patterns=patterns))
    except RepositoryNotFoundError:
        raise InputError(f"model {hub_id!r}: no such hub repository (nor local folder); check the id, or log in "
                         "(`hf auth login`) if it is private or gated") from None
    except (HfHubHTTPError, LocalEntryNotFoundError) as e:
        raise InputError(f"model {hub_id!r}: no local folder of that name, and the hub repo could not be fetched "
                         f"(nor found in the cache): {str(e).splitlines()[0]}") from None


def read_configs(folder: Path, name: str) -> dict[str, dict[str, Any]]:
    """model_index.json (optional) and the transformer, vae and text_encoder config.json of a pipeline folder, and
    transformer_2 (second expert) and image_encoder (CLIP) config.json where present."""
    configs: dict[str, dict[str, Any]] = {"model_index": {}}
    index = folder / "model_index.json"
    if index.is_file():
        configs["model_index"] = json.loads(index.read_text())
    missing = [f"{sub}/config.json" for sub in ("transformer", "vae", "text_encoder")
               if not (folder / sub / "config.json").is_file()]
    missing += [] if (folder / "tokenizer").is_dir() else ["tokenizer/"]
    if missing:
        raise InputError(f"model {name!r} is not a diffusers Wan pipeline: missing {', '.join(missing)}")
    for sub in ("transformer", "vae", "text_encoder"):
        configs[sub] = json.loads((folder / sub / "config.json").read_text())
    for sub in ("transformer_2", "image_encoder"):
        if (folder / sub / "config.json").is_file():
            configs[sub] = json.loads((folder / sub / "config.json").read_text())
    if "image_encoder" in configs and not (folder / "image_processor").is_dir():
        raise InputError(f"model {name!r} has image_encoder/ but no image_processor/ (CLIP's preprocessing)")
    return configs


def check_device(device: torch.device | str, dtype: torch.dtype, fp8: bool) -> None:
    """The device exists and runs what was asked of it (FP8 tensor cores for fp8)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device}: no CUDA GPU is visible; use device cpu")
    if fp8 and device.type == "cuda":  # CPU runs it too (slowly): the tests use that
        problem = fp8_device_problem(device)
        if problem:
            raise InputError(problem)
        if dtype != torch.bfloat16:
            # Row-wise _scaled_mm writes fp32 only on sm90 with cuBLAS 12.9+; bf16 is what FP8 is for anyway.
            raise InputError(f"fp8 (--fp8) on a GPU needs dtype bf16 (got {dtype})")


def check_pipeline_lora(files: PipelineFiles, lora: str | Path, scale: float) -> LoraFiles:
    """A LoRA folder (inference/lora.py) read and checked against the pipeline's transformer config: scale, files,
    architecture, every key's shape. Reads config files and tensor headers only; the base's weights digest is checked
    once the checkpoint is local (`from_pretrained`)."""
    check_scale(scale)
    lora_files = read_lora(lora)
    folder = files.folder if files.folder is not None else fetch(files.hub_id, HUB_CONFIGS)  # cached by inspect
    config = json.loads((folder / "transformer" / "config.json").read_text())
    check_lora_fits(lora_files, WanConfig.from_diffusers(config, vsa_gate=lora_files.needs_gate))
    return lora_files


def lora_base(folder: Path, experts: int, lora_files: LoraFiles) -> Path:
    """The transformer folder an adapter was trained on, found by its recorded weights digest: the pipeline folder's
    transformer/, or for a two-expert folder whichever of transformer/ and transformer_2/ matches (a LoRA student of a
    two-expert teacher is one transformer). Raises LoraError naming the digests when none matches."""
    candidates = [folder] if experts == 1 else [folder / "transformer", folder / "transformer_2"]
    digests = [checkpoint_digest(c) for c in candidates]
    for candidate, digest in zip(candidates, digests):
        if digest == lora_files.config["base"]["weights_sha256"]:
            return candidate
    check_base_digest(lora_files, digests[0])  # raises with the first expert's digest in the message
    return candidates[0]


# ---------------------------------------------------------------- components

def student_attention(name: str) -> AttnFn:
    """Attention `name` when the DiT gets attention metadata (the VSA student), dense without it (the CFG teacher),
    so one loaded DiT serves both modes."""
    if name not in ATTN:
        raise InputError(f"attention {name!r}; choose one of {sorted(ATTN)}")
    sparse = ATTN[name]
    if sparse is sdpa_attention:
        return sdpa_attention

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: Any = None,
                  gate: torch.Tensor | None = None) -> torch.Tensor:
        return sdpa_attention(q, k, v) if meta is None else sparse(q, k, v, meta, gate)

    return attention


def channels_last(module: nn.Module) -> nn.Module:
    """Channels-last weights for every conv (3D and 2D convs need different formats, so Module.to can't do it)."""
    for m in module.modules():
        if isinstance(m, nn.Conv3d):
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last_3d)
        elif isinstance(m, nn.Conv2d):
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
    return module


def load_image(image: ImageInput, height: int, width: int) -> torch.Tensor:
    """An image (path or PIL) resized to cover (height, width) and centre-cropped -> (1, 3, 1, H, W) in [-1, 1]."""
    import numpy as np
    from PIL import Image

    image = (image if isinstance(image, Image.Image) else Image.open(image)).convert("RGB")
    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    image = image.crop((left, top, left + width, top + height))
    pixels = torch.from_numpy(np.asarray(image).copy()).float() / 127.5 - 1  # (H, W, 3)
    return pixels.permute(2, 0, 1)[None, :, None]  # (1, 3, 1, H, W)


def load_image_encoder(folder: Path, device: torch.device | str) -> tuple[Any, nn.Module]:
    """CLIP (`image_processor/`, `image_encoder/` as transformers' CLIPImageProcessor, CLIPVisionModel) in fp32."""
    from transformers import CLIPImageProcessor, CLIPVisionModel

    processor = CLIPImageProcessor.from_pretrained(folder / "image_processor")
    encoder = CLIPVisionModel.from_pretrained(folder / "image_encoder", torch_dtype=torch.float32)
    return processor, encoder.to(device).eval().requires_grad_(False)


@torch.no_grad()
def clip_image_tokens(processor: Any, encoder: nn.Module, image: ImageInput) -> torch.Tensor:
    """The image as Wan2.1-I2V sees it: CLIP's penultimate hidden states (1, 257, 1280) float32 (the processor does
    its own resize and crop of the original image, as in diffusers' WanImageToVideoPipeline.encode_image)."""
    from PIL import Image

    image = (image if isinstance(image, Image.Image) else Image.open(image)).convert("RGB")
    pixels = processor(images=image, return_tensors="pt").pixel_values
    param = next(encoder.parameters())
    return encoder(pixel_values=pixels.to(param.device, param.dtype), output_hidden_states=True).hidden_states[-2]


def i2v_mask(latent_shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
    """(B, 4, T, H, W): ones on latent frame 0 (the given image), zeros after. diffusers builds it per pixel frame
    (frame 0 repeated 4x, then grouped 4 per latent frame): with one given frame that is exactly this."""
    batch, _, frames, height, width = latent_shape
    mask = torch.zeros(batch, I2V_MASK_CHANNELS, frames, height, width, device=device)
    mask[:, :, 0] = 1
    return mask


def encode_text(folder: Path, prompts: list[str], device: torch.device | str,
                timer: StageTimer | None = None) -> torch.Tensor:
    """Load UMT5 (fp32), encode `prompts` -> context (N, 512, D) float32 on `device`, free the encoder: for callers
    that encode once and want the memory back before the DiT loads (UMT5-XXL in fp32 is ~23 GB)."""
    tokenizer, encoder = load_text_encoder(folder, device, torch.float32)
    with (timer or StageTimer(device)).stage("text encode"):
        context, _, _ = encode_prompts(tokenizer, encoder, prompts)
    del tokenizer, encoder
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return context


# ---------------------------------------------------------------- the pipeline

class VideoPipeline:
    """Text (or image + text) to video with a Wan DiT: few-step DMD student or many-step CFG teacher, VAE decode.

    Build with `from_pretrained`, or from components: `dit` a loaded `WanModel` (readied here by
    `prepare_for_inference`; its blocks get attention `attn`), `vae` a diffusers `AutoencoderKLWan` (its decoder is
    cast to the DiT's dtype, the encoder stays as given: fp32 for the TI2V image encode), `tokenizer` + `text_encoder`
    (UMT5) for prompts. Without a VAE, `denoise` still samples latents; without a text encoder, pass `context`.
    Two experts (Wan2.2-A14B): `dit_2` the low-noise one with `boundary` = boundary_ratio * 1000 (a one-transformer
    student of that family may pass `boundary` alone: teacher mode then refuses). I2V is read off the DiT
    (in_channels = 2 z_dim + 4); Wan2.1-I2V also needs `image_processor` + `image_encoder` (CLIP) on rank 0.

    Several GPUs (inference/parallel.py): inside a process group of sp ranks (`torchrun --nproc_per_node sp`), sp=N
    spreads every DiT forward over them (Ulysses); cfg_parallel=True (teacher) runs the CFG branches on two groups of
    sp ranks each. Every rank makes the same calls with the same arguments; rank 0 (`groups.writer`) alone encodes
    the text and the image (then broadcasts them) and decodes: `decode` and `__call__` return None on the others.
    """

    def __init__(self, dit: WanModel, vae: nn.Module | None = None, tokenizer: Any = None,
                 text_encoder: nn.Module | None = None, *, attn: str | None = None, ti2v: bool | None = None,
                 fp8: bool = False, compile: bool = False, fused_rows: bool = True, vae_channels_last: bool = False,
                 vae_compile: bool = False, sp: int = 1, cfg_parallel: bool = False, dit_2: WanModel | None = None,
                 boundary: float | None = None, image_processor: Any = None,
                 image_encoder: nn.Module | None = None) -> None:
        z_dim = dit.cfg.out_channels  # the latents' width (an I2V DiT takes 2 z_dim + 4 channels in)
        self.device, self.dtype = dit.patch_embedding.weight.device, dit.patch_embedding.weight.dtype
        check_device(self.device, self.dtype, fp8)
        if dit_2 is not None and boundary is None:
            raise InputError("a second expert dit_2 needs its boundary (boundary_ratio * 1000): the timestep below "
                             "which it takes over")
        if dit_2 is not None and dit_2.cfg != dit.cfg:
            raise InputError(f"the two experts differ: {dit.cfg} vs {dit_2.cfg}")
        i2v = dit.cfg.in_channels == 2 * z_dim + I2V_MASK_CHANNELS
        vae_ratio = DEFAULTS.get(z_dim, {}).get("vae_ratio", 8) if vae is None else vae.config.scale_factor_spatial
        self.spec = VideoSpec(z_dim, vae_ratio, tuple(dit.cfg.patch_size[1:]),
                              z_dim == 48 and not i2v if ti2v is None else ti2v, i2v=i2v,
                              clip=dit.cfg.image_dim is not None, experts=1 if dit_2 is None else 2, boundary=boundary)
        self.fps = self.spec.defaults.get("fps", 16)
        attn = attn or self.spec.defaults.get("attn", "vsa")
        hopper = self.device.type != "cuda" or torch.cuda.get_device_capability(self.device)[0] >= 9
        if attn == "vsa" and fp8 and hopper:
            attn = "vsa_fp8"  # Hopper+: TMA and FP8 tensor cores; CPU runs the same reference as "vsa"
        self.attn = attn
        attn_fn = student_attention(attn)
        self.groups = sampling_groups(sp, cfg_parallel, dit.cfg.num_heads, self.device)
        experts = []
        for expert in (dit, dit_2):
            if expert is None:
                continue
            for block in expert.blocks:  # before compile: the attention is part of each block's graph
                block.attn1.attn_fn = attn_fn
            apply_sequence_parallel(expert, self.groups)  # wraps attn_fn: before the fused-row swap and compile
            experts.append(prepare_for_inference(expert, fp8=fp8, compile=compile, fused_rows=fused_rows))
        self.dit = experts[0]
        self.dit_2 = experts[1] if dit_2 is not None else None  # low-noise expert, t < self.spec.boundary
        self.image_processor, self.image_encoder = image_processor, image_encoder
        self.vae = vae
        if vae is not None:
            vae.eval().requires_grad_(False)
            vae.post_quant_conv.to(self.dtype)  # decode in the DiT's dtype (bf16), as the reference decodes
            vae.decoder.to(self.dtype)
            if vae_channels_last:
                channels_last(vae)
            if vae_compile:
                vae.decoder.compile()
        self.tokenizer, self.text_encoder = tokenizer, text_encoder

    @classmethod
    def from_pretrained(cls, model: str | Path, *, device: torch.device | str | None = None,
                        dtype: torch.dtype = torch.bfloat16, attn: str | None = None, fp8: bool = False,
                        compile: bool = False, fused_rows: bool = True, text_encoder: bool = True,
                        vae_channels_last: bool = False, vae_compile: bool = False, sp: int = 1,
                        cfg_parallel: bool = False, lora: str | Path | None = None,
                        lora_scale: float = 1.0) -> "VideoPipeline":
        """A diffusers Wan pipeline folder or hub id -> VideoPipeline on `device` (default: cuda if available).

        dtype: DiT and VAE-decode precision (UMT5 and the VAE encoder run in fp32). attn: the student's attention,
        "vsa" (default; "sdpa" for TI2V-5B), "sdpa" or "vsa_fp8"; fp8: FP8 block linears (sm89+ GPU, or CPU) and,
        with VSA on sm90+, FP8 sparse attention; compile: per-block torch.compile; text_encoder=False skips UMT5
        (pass `context` to `denoise`). sp, cfg_parallel: several GPUs (see the class). lora: an adapter folder written
        by inference/lora.py `export_lora`, merged into the DiT at `lora_scale` before FP8 / fused rows / compile.
        Configs are checked, and the device, the process group and the adapter (shapes, base architecture and
        weights digest), before any weights are read. Only rank 0 loads the text encoder.
        """
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        check_device(device, dtype, fp8)
        files = inspect_pipeline(model)
        world = dist.get_world_size() if dist.is_initialized() else 1
        check_sampling_sizes(sp, cfg_parallel, files.num_heads, world)
        writer = not dist.is_initialized() or dist.get_rank() == 0
        if attn is not None and attn not in ATTN:
            raise InputError(f"attention {attn!r}; choose one of {sorted(ATTN)}")
        lora_files = None if lora is None else check_pipeline_lora(files, lora, lora_scale)
        folder = files.download()
        base = folder
        if lora_files is not None:  # a few MB of the checkpoint's small tensors, before any weights load
            base = lora_base(folder, files.spec.experts, lora_files)
        load_text = text_encoder and writer  # UMT5-XXL is 23 GB in fp32: rank 0 encodes and broadcasts
        tokenizer, encoder = load_text_encoder(folder, device, torch.float32) if load_text else (None, None)
        vae = load_vae(folder, device, torch.float32)
        # CLIP ViT-H (0.6B) on rank 0 only, like UMT5: the image tokens are broadcast.
        processor, clip = load_image_encoder(folder, device) if files.spec.clip and writer else (None, None)
        gate = True if lora_files is not None and lora_files.needs_gate else None
        dit = load_pretrained(base, dtype=dtype, device=device, vsa_gate=gate)
        if lora_files is not None:
            load_lora(dit, lora_files, lora_scale)
        dit_2 = None
        if files.spec.experts == 2 and lora_files is None:  # Wan2.2-A14B's low-noise expert
            dit_2 = load_pretrained(folder / "transformer_2", dtype=dtype, device=device)
        return cls(dit, vae, tokenizer, encoder, attn=attn, ti2v=files.spec.ti2v, fp8=fp8, compile=compile,
                   fused_rows=fused_rows, vae_channels_last=vae_channels_last, vae_compile=vae_compile, sp=sp,
                   cfg_parallel=cfg_parallel, dit_2=dit_2, boundary=files.spec.boundary, image_processor=processor,
                   image_encoder=clip)

    # ---- stages ----
    def encode_prompts(self, prompts: list[str], timer: StageTimer | None = None) -> torch.Tensor:
        """Prompts -> UMT5 context (N, 512, D) float32 on the pipeline's device (encoded on rank 0, broadcast)."""
        context = None
        if self.groups.writer and self.text_encoder is not None:
            with (timer or StageTimer(self.device)).stage("text encode"):
                context = encode_prompts(self.tokenizer, self.text_encoder, prompts)[0]
        context = broadcast_from_first(context, self.groups, self.device)
        if context is None:
            raise InputError("this pipeline has no text encoder (built with text_encoder=False): pass context= to "
                             "denoise, e.g. from inference.pipeline.encode_text")
        return context

    def encode_image(self, image: ImageInput, height: int, width: int) -> torch.Tensor:
        """The first frame for TI2V -> normalised latents (1, C, 1, h, w) float32."""
        if self.vae is None:
            raise InputError("image conditioning needs the VAE; this pipeline was built without one")
        z = None
        if self.groups.writer:  # one encode, broadcast: every rank conditions on the same latents
            # vae_encode casts to the VAE's first parameter: the encoder's, kept in its loaded precision (fp32).
            z = normalize_latents(vae_encode(self.vae, load_image(image, height, width)), *latent_stats(self.vae))
        return broadcast_from_first(z, self.groups, self.device)

    def encode_i2v(self, image: ImageInput, size: VideoSize) -> tuple[torch.Tensor, torch.Tensor | None]:
        """I2V conditioning -> (condition (1, 4 + z_dim, T, h, w): first-frame mask + normalised VAE latents of the
        image followed by black frames, float32; CLIP tokens (1, 257, 1280) float32 for Wan2.1-I2V, else None)."""
        if self.vae is None:
            raise InputError("image conditioning needs the VAE; this pipeline was built without one")
        condition = tokens = None
        if self.groups.writer:
            first = load_image(image, size.height, size.width)  # (1, 3, 1, H, W)
            video = torch.cat([first, first.new_zeros(1, 3, size.num_frames - 1, size.height, size.width)], dim=2)
            z = normalize_latents(vae_encode(self.vae, video), *latent_stats(self.vae))  # (1, z_dim, T, h, w)
            condition = torch.cat([i2v_mask(z.shape, z.device), z], dim=1)
            if self.spec.clip:
                if self.image_encoder is None:
                    raise InputError("this DiT takes CLIP image tokens (Wan2.1-I2V) but the pipeline has no "
                                     "image_encoder: build it with image_processor= and image_encoder=")
                tokens = clip_image_tokens(self.image_processor, self.image_encoder, image)
        condition = broadcast_from_first(condition, self.groups, self.device)
        return condition, broadcast_from_first(tokens, self.groups, self.device) if self.spec.clip else None

    def check_parallel(self, size: VideoSize, teacher: bool) -> None:
        """What sequence / CFG parallelism needs of a request (nothing on one rank)."""
        if self.groups.cfg == 2 and not teacher:
            raise InputError("cfg_parallel=True splits the teacher's CFG branches; the student has none: build the "
                             "pipeline with cfg_parallel=False (and sp = the number of ranks) for the student")
        check_token_grid(self.dit.token_grid((1, self.dit.cfg.in_channels, *size.latent_shape[2:])), self.groups.sp)

    @torch.no_grad()
    def denoise(
        self,
        context: torch.Tensor,  # (1, L_txt, D_txt)
        *,
        negative_context: torch.Tensor | None = None,  # (1, L_txt, D_txt), teacher CFG's unconditional branch
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        seed: int = 1024,
        steps: Sequence[float] = STUDENT_STEPS,
        sparsity: float = 0.8,
        teacher: bool = False,
        teacher_steps: int = 50,
        guidance: float = 5.0,
        shift: float = 5.0,
        image: ImageInput | None = None,
        guidance_2: float | None = None,
        timer: StageTimer | None = None,
        progress: bool = True,
    ) -> torch.Tensor:
        """Sample normalised latents (1, C, T, H, W) float32 from text embeddings: the student (`steps`, VSA at
        `sparsity` if the pipeline's attention is sparse) or, with teacher=True, `teacher_steps` of CFG UniPC with
        `guidance` and flow `shift` (dense); `guidance_2` is the low-noise expert's scale (two experts; default
        `guidance`). Sizes default to the model's (81x480x832 Wan2.1, 121x704x1280 TI2V-5B)."""
        size = self.spec.size(height, width, num_frames)
        self.spec.check_sampling(steps, sparsity, teacher, teacher_steps, image, size)
        if guidance_2 is not None and self.dit_2 is None:
            raise InputError("guidance_2 is the low-noise expert's CFG scale; this pipeline has one transformer")
        if teacher and negative_context is None:
            raise InputError("teacher sampling needs negative_context (the encoded negative prompt)")
        self.check_parallel(size, teacher)
        check_same_request({"size": size, "seed": seed, "steps": list(steps), "sparsity": sparsity, "teacher": teacher,
                            "teacher_steps": teacher_steps, "guidance": guidance, "shift": shift,
                            "guidance_2": guidance_2,
                            "image": image is not None})  # rank 0's image is encoded and broadcast
        image_latent = condition = image_context = None
        if image is not None and self.spec.i2v:
            condition, image_context = self.encode_i2v(image, size)
        elif image is not None:
            image_latent = self.encode_image(image, size.height, size.width)
        generator = torch.Generator(self.device).manual_seed(seed)
        context = context.to(self.device)
        experts = {"model_2": self.dit_2, "boundary": self.spec.boundary if self.dit_2 is not None else None}
        if teacher:
            return denoise_teacher(self.dit, context, negative_context.to(self.device), size.latent_shape, generator,
                                   num_steps=teacher_steps, guidance=guidance, shift=shift, image_latent=image_latent,
                                   condition=condition, image_context=image_context, guidance_2=guidance_2, **experts,
                                   timer=timer, progress=progress and self.groups.writer, groups=self.groups)
        meta = None
        if self.attn != "sdpa":
            grid = self.dit.token_grid(model_input_shape(size.latent_shape, condition))
            meta = vsa_meta(grid, sparsity, self.device)  # cached per shape
        return denoise_student(self.dit, context, size.latent_shape, list(steps), generator, attn_meta=meta,
                               image_latent=image_latent, condition=condition, image_context=image_context,
                               **experts, timer=timer, progress=progress and self.groups.writer)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, timer: StageTimer | None = None) -> torch.Tensor | None:
        """Normalised latents (1, C, T, H, W) -> uint8 frames (F, H, W, 3) on the CPU; None on ranks other than 0."""
        if self.vae is None:
            raise InputError("decoding needs the VAE; this pipeline was built without one")
        if not self.groups.writer:  # every rank holds the same latents: one decode
            return None
        with (timer or StageTimer(self.device)).stage("VAE decode"):
            weight = self.vae.post_quant_conv.weight  # the decoder's dtype and device
            z = denormalize_latents(latents.to(weight.device, weight.dtype), *latent_stats(self.vae))
            video = self.vae.decode(z).sample.float().clamp(-1, 1)[0]  # (3, F, H, W) in [-1, 1]
            frames = ((video + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
            return frames.permute(1, 2, 3, 0).cpu()  # (F, H, W, 3)

    def __call__(
        self,
        prompt: str,
        *,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        seed: int = 1024,
        steps: Sequence[float] = STUDENT_STEPS,
        sparsity: float = 0.8,
        teacher: bool = False,
        teacher_steps: int = 50,
        negative_prompt: str = NEGATIVE_PROMPT,
        guidance: float = 5.0,
        shift: float = 5.0,
        image: ImageInput | None = None,
        guidance_2: float | None = None,
        progress: bool = True,
    ) -> torch.Tensor | None:
        """prompt -> video, uint8 (frames, H, W, 3) on the CPU (None on ranks other than 0 under sp / CFG-parallel).
        See `denoise` for the arguments; negative_prompt is the teacher's unconditional prompt (Wan's default)."""
        if not prompt or not prompt.strip():
            raise InputError("empty prompt")
        size = self.spec.size(height, width, num_frames)  # bad input fails before the text encoder runs
        self.spec.check_sampling(steps, sparsity, teacher, teacher_steps, image, size)
        self.check_parallel(size, teacher)
        check_same_request({"prompt": prompt, "negative_prompt": negative_prompt if teacher else None})
        context = self.encode_prompts([prompt.strip()] + ([negative_prompt] if teacher else []))
        latents = self.denoise(context[:1], negative_context=context[1:] if teacher else None, height=height,
                               width=width, num_frames=num_frames, seed=seed, steps=steps, sparsity=sparsity,
                               teacher=teacher, teacher_steps=teacher_steps, guidance=guidance, shift=shift,
                               image=image, guidance_2=guidance_2, progress=progress)
        return self.decode(latents)
