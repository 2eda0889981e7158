"""components/config.py: layering order, validation errors (key, closest key, source), Literal/Optional, round-trip;
the unvalidated merged table tools read (== load_config's values); data-path folders; a recipe entry point's error exit
(one line per problem, the prepare command for a missing path, other exceptions untouched)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from components.config import (
    ConfigError,
    config_to_dict,
    data_folders,
    dump_toml,
    exit_on_config_error,
    load_config,
    load_table,
    require_paths,
)


@dataclass(frozen=True)
class Optim:
    lr: float  # no default: changes the loss curve
    betas: tuple[float, ...]
    weight_decay: float = 0.0


@dataclass(frozen=True)
class Attn:
    student: Literal["sdpa", "vsa"]
    sparsity: float
    tile: list[int] = field(default_factory=lambda: [4, 4, 4])


@dataclass(frozen=True)
class Dmd:
    guidance: float
    timesteps: list[int]


@dataclass(frozen=True)
class Run:
    name: str
    seed: int
    compile: bool = False
    resume: Path | None = None
    max_steps: int | None = None
    tags: list[str] = field(default_factory=list)
    out: Path = Path("outputs")


@dataclass(frozen=True)
class Cfg:
    optim: Optim
    attn: Attn
    dmd: Dmd
    run: Run


BASE = """
[optim]
lr = 1e-5
betas = [0.0, 0.999]

[attn]
student = "vsa"
sparsity = 0.9

[dmd]
guidance = 3.5
timesteps = [1000, 757, 522]

[run]
name = "base"
seed = 0
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return write(tmp_path, "recipe.toml", BASE)


def test_default_toml_values_types_and_defaults(base: Path):
    cfg = load_config(Cfg, [], base)
    assert cfg.optim.lr == 1e-5 and cfg.optim.betas == (0.0, 0.999) and cfg.optim.weight_decay == 0.0
    assert cfg.attn.student == "vsa" and cfg.attn.tile == [4, 4, 4]
    assert cfg.dmd.timesteps == [1000, 757, 522]
    assert cfg.run.resume is None and cfg.run.out == Path("outputs") and cfg.run.compile is False


def test_overlays_merge_per_table_and_overrides_win(tmp_path: Path, base: Path):
    a = write(tmp_path, "a.toml", "[optim]\nlr = 2e-5\n[run]\nname = 'a'\n")
    b = write(tmp_path, "b.toml", "[run]\nname = 'b'\n")
    # b after a; overrides after all overlays, even when written before them on the command line
    argv = ["run.seed=7", "--toml", str(a), f"--toml={b}", "optim.lr=3e-5", "optim.lr=4e-5"]
    cfg = load_config(Cfg, argv, base)
    assert cfg.optim.lr == 4e-5  # last override wins over overlay a
    assert cfg.optim.betas == (0.0, 0.999)  # deep merge: overlay a kept the rest of [optim]
    assert cfg.run.name == "b" and cfg.run.seed == 7
    assert load_config(Cfg, ["--toml", str(b), "--toml", str(a)], base).run.name == "a"


def test_override_values_are_toml_literals_else_strings(base: Path):
    argv = ["dmd.guidance=5", "run.name=my_run-1", "dmd.timesteps=[1000, 500]", "run.compile=true",
            "run.tags=['x', 'y']", "run.resume=/ckpt/step-10", "attn.tile=[2,2,2]"]
    cfg = load_config(Cfg, argv, base)
    assert cfg.dmd.guidance == 5.0 and isinstance(cfg.dmd.guidance, float)  # int accepted for float
    assert cfg.run.name == "my_run-1"  # not a TOML literal -> plain string
    assert cfg.dmd.timesteps == [1000, 500] and cfg.run.compile is True and cfg.run.tags == ["x", "y"]
    assert cfg.run.resume == Path("/ckpt/step-10") and cfg.attn.tile == [2, 2, 2]


def test_optional_none_override(base: Path):
    cfg = load_config(Cfg, ["run.max_steps=10", "run.resume=ckpt"], base)
    assert cfg.run.max_steps == 10 and cfg.run.resume == Path("ckpt")
    cfg = load_config(Cfg, ["run.max_steps=10", "run.max_steps=none", "run.resume=none"], base)
    assert cfg.run.max_steps is None and cfg.run.resume is None
    assert load_config(Cfg, ["run.name=none"], base).run.name == "none"  # not Optional: just a string
    with pytest.raises(ConfigError, match=r"'run.seed'.*expected int.*none"):
        load_config(Cfg, ["run.seed=none"], base)


def test_literal_rejects_other_values_listing_allowed(base: Path):
    with pytest.raises(ConfigError, match=r"'attn.student' in command line: expected one of 'sdpa', 'vsa', got 'flash'"):
        load_config(Cfg, ["attn.student=flash"], base)


def test_unknown_key_names_closest_key_and_source(tmp_path: Path, base: Path):
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrr' \(did you mean 'optim.lr'\?\) in command line"):
        load_config(Cfg, ["optim.lrr=1e-4"], base)
    overlay = write(tmp_path, "over.toml", "[optm]\nlr = 1.0\n")
    with pytest.raises(ConfigError, match=rf"unknown key 'optm' \(did you mean 'optim'\?\) in {overlay}"):
        load_config(Cfg, ["--toml", str(overlay)], base)
    # a key in the wrong table points at the table that has it
    bad = write(tmp_path, "bad.toml", BASE.replace("sparsity = 0.9", "sparsity = 0.9\nguidance = 2.0"))
    with pytest.raises(ConfigError, match=rf"unknown key 'attn.guidance' \(did you mean 'dmd.guidance'\?\) in {bad}"):
        load_config(Cfg, [], bad)
    with pytest.raises(ConfigError, match=r"unknown key 'run.zzzzzz' \(valid keys: run.name, run.seed"):
        load_config(Cfg, ["run.zzzzzz=1"], base)


def test_missing_keys_are_named(tmp_path: Path):
    path = write(tmp_path, "partial.toml", BASE.replace("lr = 1e-5\n", "").replace('name = "base"\n', ""))
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, [], path)
    assert "missing key 'optim.lr'" in str(e.value) and "missing key 'run.name'" in str(e.value)
    assert "weight_decay" not in str(e.value)  # has a default
    # a whole missing table: each key without a default is named
    no_dmd = write(tmp_path, "no_dmd.toml", BASE.split("[dmd]")[0])
    with pytest.raises(ConfigError, match=r"missing key 'dmd.guidance'"):
        load_config(Cfg, [], no_dmd)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optim.lr='fast'", r"'optim.lr' in command line: expected float, got 'fast' \(str\)"),
        ("run.seed=1.5", r"'run.seed' in command line: expected int, got 1.5 \(float\)"),
        ("run.seed=true", r"'run.seed' in command line: expected int, got True \(bool\)"),
        ("run.compile=1", r"'run.compile' in command line: expected bool, got 1 \(int\)"),
        ("dmd.timesteps=[1000, 'x']", r"'dmd.timesteps\[1\]' in command line: expected int, got 'x'"),
        ("dmd.timesteps=1000", r"'dmd.timesteps' in command line: expected list\[int\], got 1000"),
        ("run.name=[1]", r"'run.name' in command line: expected str, got \[1\]"),
        ("run.resume=3", r"'run.resume' in command line: expected path \(string\), got 3"),
        ("dmd.guidance.x=1", r"'dmd.guidance' in command line: expected float, got a table"),
    ],
)
def test_wrong_types_name_key_expected_and_value(base: Path, override: str, expected: str):
    with pytest.raises(ConfigError, match=expected):
        load_config(Cfg, [override], base)


def test_wrong_type_names_the_file_that_set_it(tmp_path: Path, base: Path):
    overlay = write(tmp_path, "over.toml", "[run]\nseed = 'zero'\n")
    with pytest.raises(ConfigError, match=rf"'run.seed' in {overlay}: expected int"):
        load_config(Cfg, ["--toml", str(overlay)], base)
    scalar_table = write(tmp_path, "t.toml", "dmd = 3")
    with pytest.raises(ConfigError, match=rf"'dmd' in {scalar_table}: expected a table \[dmd\]"):
        load_config(Cfg, ["--toml", str(scalar_table)], base)


def test_file_and_argv_errors(tmp_path: Path, base: Path):
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.toml"):
        load_config(Cfg, ["--toml", str(tmp_path / "nope.toml")], base)
    with pytest.raises(ConfigError, match=r"config file not found: .*missing\.toml"):
        load_config(Cfg, [], tmp_path / "missing.toml")
    broken = write(tmp_path, "broken.toml", "[optim\nlr = 1")
    with pytest.raises(ConfigError, match=rf"invalid TOML in {broken}"):
        load_config(Cfg, ["--toml", str(broken)], base)
    with pytest.raises(ConfigError, match=r"unknown flag '--lr'; accepted arguments: --toml PATH"):
        load_config(Cfg, ["--lr", "1"], base)
    with pytest.raises(ConfigError, match=r"--toml needs a path"):
        load_config(Cfg, ["--toml"], base)
    with pytest.raises(ConfigError, match=r"unrecognised argument 'fast'"):
        load_config(Cfg, ["fast"], base)
    with pytest.raises(ConfigError, match=r"override 'seed=1' must look like section.key=value"):
        load_config(Cfg, ["seed=1"], base)


def test_dump_load_round_trip(tmp_path: Path, base: Path):
    argv = ["run.name=quote\"and\\back ü", "run.max_steps=3", "run.tags=['a']", "optim.lr=1.2345678901234567e-7",
            "run.resume=/x/y", "attn.sparsity=inf"]
    cfg = load_config(Cfg, argv, base)
    text = dump_toml(cfg)
    assert "# resume = none" not in text and "resume = \"/x/y\"" in text
    again = load_config(Cfg, [], write(tmp_path, "dumped.toml", text))
    assert again == cfg
    # None fields are written as comments and come back through their default
    cfg = load_config(Cfg, [], base)
    text = dump_toml(cfg)
    assert "# resume = none" in text
    assert load_config(Cfg, [], write(tmp_path, "dumped2.toml", text)) == cfg


def test_config_to_dict_is_plain(base: Path):
    d = config_to_dict(load_config(Cfg, [], base))
    assert d["optim"] == {"lr": 1e-5, "betas": [0.0, 0.999], "weight_decay": 0.0}
    assert d["run"]["out"] == "outputs" and d["run"]["resume"] is None
    assert set(d) == {f.name for f in dataclasses.fields(Cfg)}


@dataclass
class Schedule:
    warmup: int


@dataclass
class OptimN:
    lr: float
    schedule: Schedule


@dataclass
class CfgN:
    optim: OptimN


def test_nested_table_depth_three(tmp_path: Path):
    path = write(tmp_path, "n.toml", "[optim]\nlr = 1.0\n[optim.schedule]\nwarmup = 5\n")
    cfg = load_config(CfgN, ["optim.schedule.warmup=9"], path)
    assert cfg.optim.schedule.warmup == 9
    assert load_config(CfgN, [], write(tmp_path, "d.toml", dump_toml(cfg))) == cfg
    with pytest.raises(ConfigError, match=r"unknown key 'optim.schedule.warmpu' \(did you mean 'optim.schedule.warmup'"):
        load_config(CfgN, ["optim.schedule.warmpu=1"], path)


def test_load_table_is_the_merged_config_unvalidated(base: Path, tmp_path: Path):
    overlay = write(tmp_path, "o.toml", "[attn]\nsparsity = 0.5\n")
    argv = ["--toml", str(overlay), "optim.lr=3e-4", "run.name=my run", "run.resume=none"]
    cfg, table = load_config(Cfg, argv, base), load_table([*argv, "extra.key=1"], base)
    for section, values in table.items():  # what the table holds equals the validated config (defaults aside)
        if section != "extra":
            assert values == {k: v for k, v in config_to_dict(getattr(cfg, section)).items() if k in values}
    assert table["attn"]["sparsity"] == 0.5 and table["optim"]["lr"] == 3e-4 and table["run"]["resume"] is None
    assert table["extra"] == {"key": 1}  # not validated


def test_data_folders():
    assert data_folders("a/b:2, c ,d:e") == [Path("a/b"), Path("c"), Path("d:e")]


def test_exit_on_config_error(tmp_path: Path, capsys, monkeypatch):
    recipe = Path("recipes/r.py")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(SystemExit) as e, exit_on_config_error(recipe, ["--toml", "my overlay.toml", "run.name=x"]):
        require_paths({"model.base": [tmp_path / "nope", tmp_path / "nope" / "vae"], "data.path": [tmp_path]})
    fix = "python tools/prepare.py --recipe r --toml 'my overlay.toml' run.name=x"
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: model.base: {tmp_path / 'nope'} does not exist; run: {fix}\n"
    with pytest.raises(SystemExit), exit_on_config_error(recipe, []):
        raise ConfigError("unknown key 'a.b'\nwrong type for 'c.d'")
    assert capsys.readouterr().err == "error: unknown key 'a.b'\nerror: wrong type for 'c.d'\n"
    monkeypatch.setenv("LOCAL_RANK", "1")  # other ranks of a node exit quietly
    with pytest.raises(SystemExit), exit_on_config_error(recipe, []):
        raise ConfigError("x")
    assert capsys.readouterr().err == ""
    with pytest.raises(RuntimeError, match="not a config problem"), exit_on_config_error(recipe, []):
        raise RuntimeError("not a config problem")
