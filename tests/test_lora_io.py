"""LoRA adapters out of training and into sampling (inference/lora.py, VideoPipeline(lora=), tools/sample.py --lora).

The judge of the export is diffusers itself: `WanPipeline.from_pretrained(tiny).load_lora_weights(export)` (peft under
the hood) must compute what our merged model computes. The gate, which diffusers' Wan lacks, is checked through our
loader with VSA at sparsity > 0 (the gate's branch live) against `models/lora.py`'s own `merge_lora`.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from attention.vsa import vsa_attention, vsa_meta
from inference import VideoPipeline
from inference.lora import (
    CONFIG_NAME,
    GATE_WEIGHTS_NAME,
    LORA_WEIGHTS_NAME,
    LoraError,
    checkpoint_digest,
    export_lora,
    load_lora,
    read_lora,
)
from inference.pipeline import encode_text
from models.lora import AdapterView, apply_lora, merge_lora
from models.wan import WanModel, config_with
from models.wan_weights import export_state_dict, load_pretrained
from tests.multiproc import run_multiproc
from tests.sampling_reference import (
    LATENT_SHAPE,
    PROMPT,
    SIZE,
    cli_args,
    pipe_dir,
    rel_error,
)

__all__ = ["pipe_dir"]  # fixture

ROOT = Path(__file__).resolve().parents[1]
RANK, ALPHA = 4, 8.0  # scale 2: the export must fold it into lora_B for diffusers (which assumes scale 1)
TARGETS = ["self_attn", "cross_attn", "ffn"]


def sample_main(argv: list[str]) -> list[Path]:
    """tools/sample.py's main, in this process (a subprocess would spend most of this test's time importing)."""
    spec = importlib.util.spec_from_file_location("sample_cli", ROOT / "tools" / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def lora_base(pipe: Path, gate: str, seed: int = 0) -> WanModel:
    """The tiny base with student and critic adapters (and gate) set to random non-zero values."""
    base = load_pretrained(pipe, dtype=torch.float32, vsa_gate=True)
    apply_lora(base, RANK, ALPHA, TARGETS, gate=gate)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if any(part in name for part in (".lora_A.", ".lora_B.", ".delta_W.", ".delta_b.")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return base


def merged(base: WanModel, adapter: str = "student") -> WanModel:
    """models/lora.py's merge: the base with `adapter` folded in, no adapter active."""
    model = copy.deepcopy(base)
    merge_lora(model, adapter)
    return model


def inputs(shape=LATENT_SHAPE):
    gen = torch.Generator().manual_seed(3)
    return (torch.randn(shape, generator=gen), torch.tensor([700.0]), torch.randn(1, 12, 32, generator=gen))


def vsa_forward(model: WanModel, sparsity: float = 0.5) -> torch.Tensor:
    """A forward through VSA with the gate's coarse branch live."""
    for block in model.blocks:
        block.attn1.attn_fn = vsa_attention
    latents, t, context = inputs()
    meta = vsa_meta(model.token_grid(latents.shape), sparsity, "cpu")
    with torch.no_grad():
        return model(latents, t, context, attn_meta=meta)


@pytest.fixture(scope="module")
def exported(pipe_dir, tmp_path_factory):
    """{gate mode: (base with adapters, export folder)}."""
    out = {}
    for gate in ("lora", "full"):
        base = lora_base(pipe_dir, gate)
        out[gate] = (base, export_lora(base, tmp_path_factory.mktemp(f"lora_{gate}") / "export_lora",
                                       base_model=str(pipe_dir)))
    return out


def test_export_layout(exported):
    base, folder = exported["lora"]
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["rank"] == RANK and config["alpha"] == ALPHA and config["gate"] == "lora"
    weights = load_file(folder / LORA_WEIGHTS_NAME)
    to_out = base.blocks[1].attn1.to_out
    # diffusers' names and our scale folded into B
    a = weights["transformer.blocks.1.attn1.to_out.0.lora_A.weight"]
    b = weights["transformer.blocks.1.attn1.to_out.0.lora_B.weight"]
    assert torch.equal(a, to_out.lora_A["student"].detach())
    torch.testing.assert_close(b, to_out.lora_B["student"].detach() * ALPHA / RANK, rtol=0, atol=0)
    assert "transformer.blocks.0.ffn.net.0.proj.lora_A.weight" in weights
    assert len(weights) == 2 * 2 * 10  # 2 blocks x 10 linears x (A, B); no gate, no critic
    gate = load_file(folder / GATE_WEIGHTS_NAME)
    assert sorted(gate) == [f"blocks.{i}.attn1.to_gate_compress.{p}" for i in (0, 1) for p in ("lora_A", "lora_B")]
    full_gate = load_file(exported["full"][1] / GATE_WEIGHTS_NAME)
    parts = ("delta_W", "delta_b")
    assert sorted(full_gate) == [f"blocks.{i}.attn1.to_gate_compress.{p}" for i in (0, 1) for p in parts]


def test_export_through_a_view_and_other_adapter(exported, tmp_path):
    base, folder = exported["lora"]
    view = export_lora(AdapterView(base, "student", base.blocks[0].attn1.attn_fn), tmp_path / "view")
    theirs, ours = load_file(view / LORA_WEIGHTS_NAME), load_file(folder / LORA_WEIGHTS_NAME)
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    critic = load_file(export_lora(base, tmp_path / "critic", adapter="critic") / LORA_WEIGHTS_NAME)
    key = "transformer.blocks.0.attn1.to_q.lora_A.weight"
    assert torch.equal(critic[key], base.blocks[0].attn1.to_q.lora_A["critic"].detach())
    with pytest.raises(LoraError, match="no LoRA adapter 'ema'"):
        export_lora(base, tmp_path / "none", adapter="ema")


def _export_sharded_rank(rank: int, world: int, pipe: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from parallel.ac import apply_ac
    from parallel.fsdp import apply_fsdp

    base = lora_base(Path(pipe), "lora")  # the values of the `exported` fixture's model
    apply_ac(base, "full")  # wrapper names in the module tree: the export must see through them
    apply_fsdp(base, init_device_mesh("cpu", (world,)), param_dtype=torch.float32)
    export_lora(base, out, base_model=pipe)


@pytest.mark.multiproc
def test_export_from_fsdp2_shards_equals_single_device(exported, pipe_dir, tmp_path):
    run_multiproc(_export_sharded_rank, 2, str(pipe_dir), str(tmp_path / "sharded"))
    single = exported["lora"][1]
    assert (tmp_path / "sharded" / CONFIG_NAME).read_text() == (single / CONFIG_NAME).read_text()  # digest too
    for name in (LORA_WEIGHTS_NAME, GATE_WEIGHTS_NAME):
        theirs, ours = load_file(tmp_path / "sharded" / name), load_file(single / name)
        assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)


def test_diffusers_load_lora_weights_equals_our_merged_model(exported, pipe_dir):
    from diffusers import WanPipeline

    base, folder = exported["lora"]
    pipe = WanPipeline.from_pretrained(pipe_dir, torch_dtype=torch.float32)
    latents, t, context = inputs()
    with torch.no_grad():
        before = pipe.transformer(latents, t, context, return_dict=False)[0]
        pipe.load_lora_weights(folder)
        theirs = pipe.transformer(latents, t, context, return_dict=False)[0]
        ours = merged(base)(latents, t, context)  # dense: diffusers' Wan has no VSA gate
        unmerged = AdapterView(base, "student", base.blocks[0].attn1.attn_fn)(latents, t, context)
    assert rel_error(theirs, before) > 1e-2  # the adapter changes the output: the comparison below can fail
    assert rel_error(theirs, ours) <= 1e-5
    assert rel_error(unmerged, ours) <= 1e-5


@pytest.mark.parametrize("gate", ["lora", "full"])
def test_load_lora_round_trip_equals_merged_export(exported, pipe_dir, gate):
    base, folder = exported[gate]
    reference = merged(base)
    loaded = load_pretrained(pipe_dir, dtype=torch.float32, vsa_gate=True)
    load_lora(loaded, folder)
    ours = {k: v for k, v in reference.state_dict().items() if ".lora_" not in k and ".delta_" not in k}
    assert ours.keys() == loaded.state_dict().keys()
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, ours[key], rtol=1e-6, atol=1e-7, msg=key)
    gate_weight = loaded.blocks[0].attn1.to_gate_compress.weight
    assert gate_weight.abs().max() > 0  # the gate arrived (the base's is zero)
    assert rel_error(vsa_forward(loaded), vsa_forward(reference)) <= 1e-6


def test_load_lora_scale(exported, pipe_dir):
    base, folder = exported["lora"]
    half = copy.deepcopy(base)
    with torch.no_grad():
        for name, p in half.named_parameters():
            if ".lora_B." in name:
                p.mul_(0.5)
    loaded = load_pretrained(pipe_dir, dtype=torch.float32, vsa_gate=True)
    load_lora(loaded, folder, scale=0.5)
    assert rel_error(vsa_forward(loaded), vsa_forward(merged(half))) <= 1e-6
    plain = load_pretrained(pipe_dir, dtype=torch.float32, vsa_gate=True)
    load_lora(plain, folder, scale=0.0)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(),
                                                  load_pretrained(pipe_dir, dtype=torch.float32,
                                                                  vsa_gate=True).state_dict().values()))


def test_sample_cli_lora_equals_hand_merged_model(exported, pipe_dir, tmp_path, capsys):
    base, folder = exported["lora"]
    (video,) = sample_main(["--model", str(pipe_dir), "--prompt", PROMPT, *cli_args(SIZE), "--device", "cpu",
                            "--dtype", "fp32", "--attn", "vsa", "--sparsity", "0.5", "--seed", "5", "--lora",
                            f"{folder}:1", "--out", str(tmp_path), "--save-latents"])
    assert f"lora {folder} at scale 1: LoRA rank {RANK}" in capsys.readouterr().out
    latents_file = video.with_suffix(".latents.pt")
    # The hand-merged model: models/lora.py's merged_state_dict route, as a plain WanModel.
    plain = WanModel(config_with(base.cfg, vsa_gate=True))
    plain.load_state_dict({k: v for k, v in merged(base).state_dict().items()
                           if ".lora_" not in k and ".delta_" not in k})
    pipe = VideoPipeline(plain, attn="vsa")
    expected = pipe.denoise(encode_text(pipe_dir, [PROMPT], "cpu"), **SIZE, seed=5, sparsity=0.5, progress=False)
    latents = torch.load(latents_file)
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- bad input, before any weights load

@pytest.fixture
def no_weight_loads(monkeypatch):
    """VideoPipeline.from_pretrained must fail before loading any component."""
    from inference import pipeline

    def forbidden(*args, **kwargs):
        raise AssertionError("weights were loaded before the bad input was reported")

    for name in ("load_pretrained", "load_vae", "load_text_encoder"):
        monkeypatch.setattr(pipeline, name, forbidden)


def copy_export(folder: Path, dest: Path) -> Path:
    dest.mkdir()
    for f in folder.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


def test_bad_path_and_scale(exported, pipe_dir, tmp_path, no_weight_loads):
    with pytest.raises(LoraError, match="does not exist"):
        VideoPipeline.from_pretrained(pipe_dir, device="cpu", lora=tmp_path / "nope")
    with pytest.raises(LoraError, match=f"lacks {LORA_WEIGHTS_NAME}"):
        VideoPipeline.from_pretrained(pipe_dir, device="cpu", lora=tmp_path)
    with pytest.raises(LoraError, match="scale 'x' is not a number"):
        VideoPipeline.from_pretrained(pipe_dir, device="cpu", lora=exported["lora"][1], lora_scale="x")


def test_sample_cli_rejects_bad_lora_before_loading(exported, pipe_dir, tmp_path, monkeypatch):
    from inference import pipeline

    monkeypatch.setattr(pipeline, "load_text_encoder", None)  # the text is encoded first: must not get there
    folder = exported["lora"][1]
    for arg, message in ((f"{folder}:abc", "scale 'abc' is not a number"),
                         (str(tmp_path / "missing"), "does not exist")):
        with pytest.raises(SystemExit, match=message):
            sample_main(["--model", str(pipe_dir), "--prompt", PROMPT, *cli_args(SIZE), "--device", "cpu", "--lora",
                         arg])


def test_adapter_from_another_architecture(pipe_dir, tmp_path, no_weight_loads):
    """A 1.3B adapter on a 14B base, in miniature: trained on a 3-layer model, loaded onto the 2-layer one."""
    other = WanModel(config_with(load_pretrained(pipe_dir).cfg, num_layers=3))
    apply_lora(other, RANK, ALPHA, TARGETS)
    folder = export_lora(other, tmp_path / "other")
    with pytest.raises(LoraError, match="trained on a different base.*num_layers: adapter 3, model 2"):
        VideoPipeline.from_pretrained(pipe_dir, device="cpu", lora=folder)


def test_shape_and_rank_mismatch(exported, pipe_dir, tmp_path, no_weight_loads):
    folder = exported["lora"][1]
    key_a = "transformer.blocks.0.attn2.to_k.lora_A.weight"
    key_b = "transformer.blocks.0.attn2.to_k.lora_B.weight"
    shapes = copy_export(folder, tmp_path / "shape")
    weights = load_file(folder / LORA_WEIGHTS_NAME)
    save_file({**weights, key_a: torch.zeros(RANK, 48), key_b: torch.zeros(48, RANK)}, shapes / LORA_WEIGHTS_NAME)
    with pytest.raises(LoraError, match=rf"{LORA_WEIGHTS_NAME}: blocks.0.attn2.to_k lora_A \({RANK}, 48\) / lora_B "
                                        rf"\(48, {RANK}\) give a \(48, 48\) update, the model's weight is \(64, 64\)"):
        VideoPipeline.from_pretrained(pipe_dir, device="cpu", lora=shapes)
    ranks = copy_export(folder, tmp_path / "rank")
    save_file({**weights, key_b: torch.zeros(64, 2 * RANK)}, ranks / LORA_WEIGHTS_NAME)
    with pytest.raises(LoraError, match=rf"blocks.0.attn2.to_k: rank mismatch, lora_A \({RANK}, 64\) has rank {RANK} "
                                        rf"but lora_B \(64, {2 * RANK}\) has rank {2 * RANK}"):
        read_lora(ranks)


def test_other_base_weights(exported, pipe_dir, tmp_path, no_weight_loads):
    """Same architecture, other checkpoint: the digest of the base's small tensors tells them apart."""
    folder = exported["lora"][1]
    other = load_pretrained(pipe_dir, dtype=torch.float32)
    with torch.no_grad():
        other.blocks[1].ffn.fc2.bias.add_(0.01)
    export_state_dict(other.state_dict(), other.cfg, tmp_path / "other" / "transformer")
    for sub in ("vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"):
        (tmp_path / "other" / sub).symlink_to(pipe_dir / sub)
    with pytest.raises(LoraError, match="trained on other base weights"):
        VideoPipeline.from_pretrained(tmp_path / "other", device="cpu", lora=folder)
    other_gated = load_pretrained(tmp_path / "other", vsa_gate=True)
    with pytest.raises(LoraError, match="trained on other base weights"):
        load_lora(other_gated, folder)
    assert other_gated.blocks[0].attn1.to_gate_compress.weight.abs().max() == 0  # nothing merged


def test_gate_needs_a_gated_model(exported, pipe_dir):
    with pytest.raises(LoraError, match="brings a VSA gate.*vsa_gate=True"):
        load_lora(load_pretrained(pipe_dir), exported["full"][1])


def test_checkpoint_digest_is_read_once_per_unchanged_checkpoint(pipe_dir, tmp_path, monkeypatch):
    """tools/sample.py checks a LoRA base before VideoPipeline.from_pretrained checks it again: the second call reuses
    the first's digest, and a rewritten checkpoint is read afresh (its digest then differs, as the weights do)."""
    import inference.lora as lora_io

    folder = tmp_path / "transformer"
    model = load_pretrained(pipe_dir, dtype=torch.float32)
    export_state_dict(model.state_dict(), model.cfg, folder)
    reads = []
    real = lora_io._checkpoint_digest
    monkeypatch.setattr(lora_io, "_checkpoint_digest", lambda files: reads.append(1) or real(files))
    first = checkpoint_digest(folder)
    assert checkpoint_digest(folder) == first and len(reads) == 1
    assert first == lora_io.model_digest(model)  # the same fingerprint the trained adapter records
    with torch.no_grad():
        model.blocks[0].ffn.fc2.bias.add_(0.01)
    export_state_dict(model.state_dict(), model.cfg, folder)
    assert checkpoint_digest(folder) != first and len(reads) == 2
