"""Typed configs: dataclasses loaded from YAML, composed, overridden and validated once.

A config schema is a (nested) dataclass whose fields are declared with :func:`opt`,
which records a one-line meaning used by ``fvlm config show``::

    @dataclass
    class TrainConfig:
        lr: float = opt(1e-4, "peak learning rate of AdamW")
        steps: int = opt(100, "optimizer steps")

Loading order (later wins): the schema defaults, the command's default YAML in
``configs/``, each ``--config FILE`` in order (a file may name ``_base_: other.yaml``
to compose), each ``--set key.sub=value``, then dedicated CLI flags. Unknown keys,
wrong types and failed checks raise :class:`~fvlm.errors.ConfigError` with a message
naming the key (and the closest valid key for a typo).
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from .errors import ConfigError, FvlmError
from .resources import config_path

__all__ = ["opt", "load_config", "build", "to_dict", "dump_config", "describe", "parse_set",
           "merge", "read_yaml", "ConfigError"]


def opt(default: Any = dataclasses.MISSING, help: str = "", *, choices: tuple | None = None) -> Any:
    """Declare a config field with its default and a one-line meaning.

    Mutable defaults (lists, dicts, dataclass instances) are copied per instance.
    """
    md = {"help": help}
    if choices is not None:
        md["choices"] = tuple(choices)
    if isinstance(default, (list, dict, set)) or dataclasses.is_dataclass(default):
        import copy

        proto = default
        return dataclasses.field(default_factory=lambda: copy.deepcopy(proto), metadata=md)
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=md)
    return dataclasses.field(default=default, metadata=md)


# --------------------------------------------------------------------------- YAML


def read_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping, following ``_base_`` (a path relative to the file or to configs/)."""
    p = Path(path)
    if not p.is_file():
        p = config_path(path)
    try:
        with open(p, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a config file must hold a mapping, got {type(data).__name__}")
    base = data.pop("_base_", None)
    if base is not None:
        bases = base if isinstance(base, list) else [base]
        merged: dict = {}
        for b in bases:
            cand = p.parent / b
            merged = merge(merged, read_yaml(cand if cand.is_file() else b))
        data = merge(merged, data)
    return data


def merge(a: dict, b: dict) -> dict:
    """Deep-merge ``b`` into a copy of ``a`` (mappings merge, everything else replaces)."""
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_set(item: str) -> dict:
    """Turn ``"train.lr=1e-4"`` into ``{"train": {"lr": "1e-4"-parsed}}``; values parse as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set has an empty key in {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    out: dict = {}
    cur = out
    parts = key.split(".")
    for part in parts[:-1]:
        cur = cur.setdefault(part, {})
    cur[parts[-1]] = value
    return out


# --------------------------------------------------------------------------- build / validate


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        inner = " or ".join(_type_name(a) for a in args)
        return f"{inner} or null" if len(args) < len(get_args(tp)) else inner
    if origin in (list, tuple):
        args = get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        args = get_args(tp)
        return f"mapping of {_type_name(args[1])}" if args else "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value in allowed:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"config key '{key}' must be one of {', '.join(map(repr, allowed))}, got {value!r}{hint}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' expects a mapping, got {value!r}")
        return build(tp, value, _prefix=key + ".")
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"config key '{key}' expects {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        inner = args[0] if args else Any
        seq = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(seq) if origin is tuple else seq
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' expects a mapping, got {value!r}")
        args = get_args(tp)
        vt = args[1] if args else Any
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"config key '{key}' expects true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' expects int, got {value!r} ({type(value).__name__})")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects float, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-4" as a string
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' expects float, got {value!r} ({type(value).__name__})")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}' expects str, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"config key '{key}' expects a path, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}")


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _all_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        k = prefix + f.name
        keys.append(k)
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(_all_keys(hints[f.name], k + "."))
    return keys


def build(cls, data: dict, _prefix: str = "", _root=None):
    """Build dataclass ``cls`` from a mapping, validating every key and type."""
    root = _root or cls
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{_prefix.rstrip('.') or '<root>'}' must be a mapping")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            full = _prefix + str(k)
            close = difflib.get_close_matches(full, [_prefix + n for n in names], n=1, cutoff=0.6)
            if not close:  # perhaps the right key in the wrong section
                close = difflib.get_close_matches(full, _all_keys(root), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{full}'{hint}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], _prefix + f.name)
        elif dataclasses.is_dataclass(hints[f.name]) and f.default is dataclasses.MISSING \
                and f.default_factory is dataclasses.MISSING:
            kwargs[f.name] = build(hints[f.name], {}, _prefix + f.name + ".", root)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"config key '{_prefix + f.name}' is required ({f.metadata.get('help', '')})")
    for f in dataclasses.fields(cls):
        ch = f.metadata.get("choices")
        if ch and f.name in kwargs and kwargs[f.name] not in ch:
            raise ConfigError(f"config key '{_prefix + f.name}' must be one of {', '.join(map(str, ch))}, "
                              f"got {kwargs[f.name]!r}")
    try:
        obj = cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"invalid config{(' section ' + _prefix.rstrip('.')) if _prefix else ''}: {e}") from None
    return obj


def load_config(cls, files: list | tuple = (), sets: list | tuple = (), base: str | None = None,
                extra: dict | None = None):
    """Load and validate a config.

    Args:
        cls: the schema dataclass.
        files: YAML files (paths or names under ``configs/``), merged in order.
        sets: ``key.sub=value`` overrides, applied after the files.
        base: the command's default YAML under ``configs/`` (merged first), or None.
        extra: a mapping merged last (dedicated CLI flags).
    """
    data: dict = {}
    if base:
        data = merge(data, read_yaml(config_path(base)))
    for f in files or ():
        p = Path(f)
        if not p.is_file():
            try:
                p = config_path(f)
            except FvlmError:
                raise ConfigError(f"config file not found: {f}") from None
        data = merge(data, read_yaml(p))
    for s in sets or ():
        data = merge(data, parse_set(s))
    if extra:
        data = merge(data, extra)
    return build(cls, data)


# --------------------------------------------------------------------------- dump / describe


def to_dict(cfg) -> dict:
    """A plain, YAML-safe mapping of a config (tuples become lists, paths strings)."""
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v
    return conv(cfg)


def dump_config(cfg, path: str | os.PathLike) -> Path:
    """Write the fully resolved config as YAML (atomically) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(f"# resolved {type(cfg).__name__} written by fvlm\n")
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)
    return path


def describe(cls, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """Rows of (key, type, default, meaning) for every key of a schema, nested keys dotted."""
    rows = []
    hints = _hints(cls)
    inst = None
    try:
        inst = cls()
    except TypeError:
        pass
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = prefix + f.name
        if dataclasses.is_dataclass(tp):
            rows.append((key, "section", "", f.metadata.get("help", "")))
            rows.extend(describe(tp, key + "."))
            continue
        default = getattr(inst, f.name) if inst is not None else (
            f.default if f.default is not dataclasses.MISSING else "(required)")
        rows.append((key, _type_name(tp), to_dict(default) if dataclasses.is_dataclass(default) else default,
                     f.metadata.get("help", "")))
    return rows
