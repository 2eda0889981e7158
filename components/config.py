"""TOML <-> dataclass configuration for recipes.

A recipe's schema is a dataclass whose fields are dataclasses, one per TOML table. The config is resolved from, in
order: the default (sibling) TOML, each `--toml PATH` overlay (deep-merged per table), then `section.key=value`
overrides. Everything is validated before it is returned, so a typo fails before any GPU work:

    cfg = load_config(RecipeConfig, sys.argv[1:], default_toml=Path(__file__).with_suffix(".toml"))

Supported field types: int, float (an int is accepted), str, bool, pathlib.Path, list[int | float | str],
tuple[X, ...], Literal[...], X | None, and nested dataclasses. TOML has no null: a field is None only through its
dataclass default or a `key=none` override.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import shlex
import sys
import types
import typing
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Literal, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")

COMMAND_LINE = "command line"
USAGE = "accepted arguments: --toml PATH, --toml=PATH (repeatable overlays), section.key=value (TOML literal)"


class ConfigError(ValueError):
    """A bad config: unknown, missing or mistyped key, or an unreadable file. The message names the key and source."""


class _CliNone:
    """`key=none` on the command line: None for an Optional field, the string "none" otherwise."""

    def __repr__(self) -> str:
        return "none"


_NONE = _CliNone()


# ---------------------------------------------------------------------------------------------------------- loading


def load_config(schema: type[T], argv: list[str], default_toml: Path | None = None) -> T:
    """Resolve `schema` from the default TOML, `--toml` overlays and `key=value` overrides in `argv`; validate all."""
    if not (dataclasses.is_dataclass(schema) and isinstance(schema, type)):
        raise TypeError(f"schema must be a dataclass type, got {schema!r}")
    toml_paths, overrides = _parse_argv(argv)

    layers: list[tuple[str, dict]] = []  # (source, table), applied in order
    if default_toml is not None:
        layers.append((str(default_toml), read_toml(Path(default_toml))))
    layers += [(str(p), read_toml(p)) for p in toml_paths]
    layers += [(COMMAND_LINE, o) for o in overrides]

    errors: list[str] = []
    merged: dict = {}
    origin: dict[str, str] = {}  # dotted key -> source that last set it
    for source, layer in layers:
        _check_keys(layer, schema, "", source, errors, schema)
        _merge(merged, layer, "", source, origin)
    if errors:  # unknown keys: building would only add noise
        raise ConfigError("\n".join(errors))
    cfg = _build(schema, merged, "", origin, errors)
    if errors:
        raise ConfigError("\n".join(errors))
    return cfg


def load_table(argv: list[str], default_toml: Path | None = None) -> dict:
    """The merged table a recipe would see (default TOML, `--toml` overlays, `key=value` overrides), unvalidated.

    For tools that read a recipe's paths without importing the recipe (tools/prepare.py); `key=none` gives None.
    """
    toml_paths, overrides = _parse_argv(argv)
    layers = ([read_toml(Path(default_toml))] if default_toml is not None else []) + [read_toml(p) for p in toml_paths]
    merged: dict = {}
    for layer in layers + overrides:
        _merge(merged, layer, "", "", {})

    def plain(table: dict) -> dict:
        return {k: plain(v) if isinstance(v, dict) else (None if v is _NONE else v) for k, v in table.items()}

    return plain(merged)


def read_toml(path: Path) -> dict:
    """Parse one TOML file; a missing or malformed file is a ConfigError naming the path."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"invalid TOML in {path}: {e}") from e


def _parse_argv(argv: list[str]) -> tuple[list[Path], list[dict]]:
    """Split argv into overlay paths and override tables ({"optim": {"lr": 1e-5}}), both in order."""
    toml_paths: list[Path] = []
    overrides: list[dict] = []
    args = iter(argv)
    for arg in args:
        if arg == "--toml":
            path = next(args, None)
            if path is None:
                raise ConfigError(f"--toml needs a path; {USAGE}")
            toml_paths.append(Path(path))
        elif arg.startswith("--toml="):
            toml_paths.append(Path(arg.removeprefix("--toml=")))
        elif arg.startswith("-"):
            raise ConfigError(f"unknown flag {arg!r}; {USAGE}")
        elif "=" in arg:
            overrides.append(_parse_override(arg))
        else:
            raise ConfigError(f"unrecognised argument {arg!r}; {USAGE}")
    return toml_paths, overrides


def _parse_override(arg: str) -> dict:
    key, raw = arg.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override {arg!r} must look like section.key=value; {USAGE}")
    if raw.strip() == "none":
        value: Any = _NONE
    else:
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # not a TOML literal: a bare string such as run.name=my_run
    for part in reversed(parts):
        value = {part: value}
    return value


def _merge(dst: dict, src: dict, prefix: str, source: str, origin: dict[str, str]) -> None:
    """Deep-merge table `src` into `dst` (tables merge, everything else replaces), recording each key's source."""
    for k, v in src.items():
        key = prefix + k
        origin[key] = source
        if isinstance(v, dict):
            if not isinstance(dst.get(k), dict):
                dst[k] = {}
            _merge(dst[k], v, key + ".", source, origin)
        else:
            dst[k] = v


# ------------------------------------------------------------------------------------------------------- validation


def _check_keys(table: dict, cls: type, prefix: str, source: str, errors: list[str], root: type) -> None:
    """Report every key of one layer that the schema does not have, with the closest valid key."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for k, v in table.items():
        key = prefix + k
        if k not in fields:
            errors.append(f"unknown key '{key}'{_suggest(key, cls, prefix, root)} in {source}")
        elif dataclasses.is_dataclass(hints[k]):
            if isinstance(v, dict):
                _check_keys(v, hints[k], key + ".", source, errors, root)
            else:
                errors.append(f"wrong type for '{key}' in {source}: expected a table [{key}], got {v!r}")
        elif isinstance(v, dict):
            errors.append(f"wrong type for '{key}' in {source}: expected {_type_name(hints[k])}, got a table")


def _suggest(key: str, cls: type, prefix: str, root: type) -> str:
    # Compare against every dotted key at the same depth, so a key put in the wrong table finds its real table.
    candidates = [c for c in _all_keys(root, "") if c.count(".") == key.count(".")]
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if match:
        return f" (did you mean '{match[0]}'?)"
    siblings = [prefix + f.name for f in dataclasses.fields(cls) if f.init]
    return f" (valid keys: {', '.join(siblings)})"


def _all_keys(cls: type, prefix: str) -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _all_keys(hints[f.name], prefix + f.name + ".")
    return keys


def _build(cls: type[T], table: dict, prefix: str, origin: dict[str, str], errors: list[str]) -> T:
    """Instantiate `cls` from a merged table, converting values and collecting missing / wrong-type errors."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key, tp = prefix + f.name, hints[f.name]
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        if dataclasses.is_dataclass(tp):
            if f.name in table or not has_default:
                kwargs[f.name] = _build(tp, table.get(f.name, {}), key + ".", origin, errors)
        elif f.name in table:
            try:
                kwargs[f.name] = _convert(table[f.name], tp, key)
            except _TypeMismatch as e:
                errors.append(f"wrong type for '{e.key}' in {origin.get(key, '?')}: expected {e.expected}, got {e.got}")
        elif not has_default:
            errors.append(f"missing key '{key}' (no default: set it in the TOML or as {key}=VALUE)")
    if errors:
        return None  # type: ignore[return-value]  # the caller raises; never instantiate a partial config
    return cls(**kwargs)


class _TypeMismatch(Exception):
    def __init__(self, key: str, expected: str, got: Any):
        self.key, self.expected = key, expected
        self.got = "none" if got is _NONE else f"{got!r} ({type(got).__name__})"


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` (a TOML value) against field type `tp` and convert it (int -> float, list -> tuple, str -> Path)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1 or len(args) != 2:
            raise TypeError(f"config field '{key}': only `X | None` unions are supported, got {tp}")
        if value is _NONE:
            return None
        return _convert(value, inner[0], key)
    if value is _NONE:
        value = "none"  # `key=none` on a non-Optional field is just the string "none"
    if origin is Literal:
        # `type(value) is type(a)` keeps True from matching 1 and 1 from matching 1.0
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _TypeMismatch(key, "one of " + ", ".join(repr(a) for a in args), value)
    if origin is list or origin is tuple:
        if not isinstance(value, list):
            raise _TypeMismatch(key, _type_name(tp), value)
        if origin is list:
            return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise _TypeMismatch(key, _type_name(tp), value)
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Path:
        if isinstance(value, str):
            return Path(value)  # relative paths stay relative to the working directory
    else:
        raise TypeError(f"config field '{key}': unsupported type {tp}")
    raise _TypeMismatch(key, _type_name(tp), value)


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args).replace("NoneType", "None")
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple):
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    if tp is Path:
        return "path (string)"
    return getattr(tp, "__name__", str(tp))


# ---------------------------------------------------------------------------------------------------------- writing


def config_to_dict(cfg: Any) -> dict:
    """Nested plain dict of TOML-friendly values: Path -> str, tuple -> list; None stays None."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(cfg)


def dump_toml(cfg: Any) -> str:
    """The resolved config as TOML; `load_config(type(cfg), [], that_file)` gives back an equal config.

    None has no TOML spelling, so None fields are written as a comment (`# key = none`); they load back as None only
    through their dataclass default.
    """
    lines: list[str] = []
    _dump_table(config_to_dict(cfg), "", lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def _dump_table(table: dict, name: str, lines: list[str]) -> None:
    if name:
        lines += ["", f"[{name}]"]
    # TOML needs a table's own keys before its sub-tables.
    for k, v in table.items():
        if not isinstance(v, dict):
            lines.append(f"# {k} = none" if v is None else f"{k} = {_toml_value(v)}")
    for k, v in table.items():
        if isinstance(v, dict):
            _dump_table(v, f"{name}.{k}" if name else k, lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)  # shortest repr that round-trips exactly
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string (ASCII, \uXXXX escapes) is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} ({type(v).__name__}) as TOML")


class MissingPathError(ConfigError):
    """Config paths that do not exist, as {config key: path}; the message has one line per key."""

    def __init__(self, missing: dict[str, Path]):
        self.missing = missing
        super().__init__("\n".join(f"{key}: {path} does not exist" for key, path in missing.items()))


def require_paths(paths: dict[str, Path | list[Path]]) -> None:
    """One MissingPathError naming the key of every path in {config key: path or paths} that does not exist (checked
    before any work)."""
    missing = {}
    for key, value in paths.items():
        absent = [p for p in (value if isinstance(value, list) else [value]) if not Path(p).exists()]
        if absent:
            missing[key] = absent[0]
    if missing:
        raise MissingPathError(missing)


def data_folders(data_path: str) -> list[Path]:
    """The folders a data-path value names: 'dirA:2,dirB' -> [dirA, dirB] (repeat counts dropped), for existence
    checks before the dataset is opened."""
    folders = []
    for item in filter(None, (s.strip() for s in data_path.split(","))):
        head, sep, tail = item.rpartition(":")
        folders.append(Path(head if sep and tail.isdigit() else item))
    return folders


def prepare_command(recipe: Path, argv: list[str]) -> str:
    """The tools/prepare.py command that writes the paths of `recipe` launched with `argv` (same overlays/overrides)."""
    return shlex.join(["python", "tools/prepare.py", "--recipe", Path(recipe).stem, *argv])


@contextmanager
def exit_on_config_error(recipe: Path, argv: list[str]) -> Iterator[None]:
    """Around a recipe's entry point: a ConfigError exits the process (status 2) with its message and no traceback; a
    missing path's line names the command that creates it. Every other exception propagates with its traceback.

    Under torchrun only local rank 0 prints, so a node shows the message once.
    """
    try:
        yield
    except MissingPathError as e:
        fix = prepare_command(recipe, argv)
        _exit_with([f"{key}: {path} does not exist; run: {fix}" for key, path in e.missing.items()])
    except ConfigError as e:
        _exit_with(str(e).splitlines())


def _exit_with(lines: list[str]) -> None:
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print("\n".join(f"error: {line}" for line in lines), file=sys.stderr, flush=True)
    raise SystemExit(2)


@contextmanager
def as_config_error(key: str | None = None) -> Iterator[None]:
    """Re-raise a ValueError from a check run inside the block as a ConfigError, its message prefixed `key: `."""
    try:
        yield
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{key}: {e}" if key else str(e)) from None
