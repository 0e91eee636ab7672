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
import logging
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from .errors import ConfigError, FvlmError
from .resources import config_path, configs_dir

__all__ = ["opt", "load_config", "build", "to_dict", "dump_config", "describe", "parse_set",
           "merge", "read_yaml", "safe_yaml", "moved_key", "ConfigError"]

_log = logging.getLogger("fvlm.config")


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


def moved_key(cfg, old_key: str, new_key: str) -> None:
    """A key that moved to another section, read under its old name for one release.

    Call from the root schema's ``__post_init__`` with dotted keys (``"train.batch_size"``,
    ``"data.batch_size"``); the old field defaults to None. When the old key was given, its value
    replaces the new key's (the old spelling is what the user wrote; the new key may only hold the
    shipped default), the old field goes back to None and one warning line names the new key.
    """
    (old_sec, old_name), (new_sec, new_name) = old_key.split("."), new_key.split(".")
    old = getattr(cfg, old_sec)
    v = getattr(old, old_name)
    if v is None:
        return
    _log.warning("config key '%s' is deprecated (read for one release): use '%s'", old_key, new_key)
    setattr(getattr(cfg, new_sec), new_name, v)
    setattr(old, old_name, None)


# --------------------------------------------------------------------------- YAML


#: a config file larger than this is refused before it is parsed (the shipped ones are a few KB)
MAX_CONFIG_BYTES = 1 << 20
#: a document whose aliases expand to more nodes than this is refused ("billion laughs")
MAX_EXPANDED_NODES = 100_000
#: ``_base_`` chains deeper than this are refused
MAX_INCLUDE_DEPTH = 32


def _no_duplicate_keys(mapping, where) -> None:
    """A mapping that names a key twice is refused (YAML loaders keep the last silently, so an
    edited config could train with a value its reader never sees)."""
    keys: dict = {}
    for k, _ in mapping.value:
        if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
            if k.value in keys:
                raise ConfigError(f"{where}: key {k.value!r} appears twice in one mapping (lines "
                                  f"{keys[k.value]} and {k.start_mark.line + 1}); keep one")
            keys[k.value] = k.start_mark.line + 1


def _expanded_size(node, memo: dict, stack: set, where) -> int:
    """Nodes a YAML node tree expands to when every alias is copied out (memoised, cycle-safe);
    each mapping is also checked for a repeated key on this one walk."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in stack:
        raise ConfigError(f"{where}: a YAML alias refers to itself (recursive anchor); refused")
    stack.add(key)
    if isinstance(node, yaml.SequenceNode):
        kids = node.value
    elif isinstance(node, yaml.MappingNode):
        _no_duplicate_keys(node, where)
        kids = [x for kv in node.value for x in kv]
    else:
        kids = []
    n = 1
    for k in kids:
        n += _expanded_size(k, memo, stack, where)
        if n > MAX_EXPANDED_NODES:
            raise ConfigError(f"{where}: YAML aliases expand to more than {MAX_EXPANDED_NODES} values "
                              "(nested anchors, a \"billion laughs\"); refused")
    stack.discard(key)
    memo[key] = n
    return n


def safe_yaml(text: str, where) -> Any:
    """``yaml.safe_load`` of untrusted text with a size cap and an alias-expansion cap.

    Errors never quote the text (only YAML's position of the problem).
    """
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where}: {len(text)} characters, above the {MAX_CONFIG_BYTES} a config may hold; refused")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {}, set(), where)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or type(e).__name__}{at})") from None
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply; refused") from None
    finally:
        loader.dispose()


def _include_roots(p: Path, trusted: tuple) -> tuple:
    return tuple(r.resolve() for r in (configs_dir(), *trusted))


def _resolve_base(b, p: Path, trusted: tuple) -> Path:
    """Where ``_base_: b`` of file ``p`` points: relative to ``p`` or to configs/, inside a trusted root.

    Trusted roots: the package's configs/ and the folders of the files named on the command
    line. Anything else (an absolute path, ``../../elsewhere``) is refused without being read.
    """
    if not isinstance(b, str) or not b.strip():
        raise ConfigError(f"{p}: _base_ must name a YAML file (or a list of them), got {type(b).__name__}")
    if not b.endswith((".yaml", ".yml")):
        raise ConfigError(f"{p}: _base_ {b!r} is not a .yaml file; refused")
    roots = _include_roots(p, trusted)
    cands = [Path(b)] if os.path.isabs(b) else [p.parent / b, configs_dir() / b]
    for c in cands:
        r = c.resolve()
        if any(r.is_relative_to(root) for root in roots):
            if r.is_file():
                return r
        elif c.exists():
            raise ConfigError(f"{p}: _base_ {b!r} lies outside configs/ and the folders of the --config files; "
                              "refused (name it with --config instead)")
    raise ConfigError(f"{p}: _base_ {b!r} not found (relative to {p.parent} or configs/)")


def read_yaml(path: str | os.PathLike, *, _trusted: tuple = (), _chain: tuple = ()) -> dict:
    """Read a YAML mapping, following ``_base_`` (a path relative to the file or to configs/).

    ``path`` itself is trusted (the caller named it); its includes must stay inside configs/
    or the folder of a file named on the command line, a loop of includes is named, and the
    file is capped in size and alias expansion (:func:`safe_yaml`).
    """
    p = Path(path)
    if not p.is_file():
        p = config_path(path)
    p = p.resolve()
    if not _trusted:
        _trusted = (p.parent,)
    if p in _chain:
        loop = " -> ".join(x.name for x in (*_chain[_chain.index(p):], p))
        raise ConfigError(f"{_chain[0]}: _base_ loop: {loop}")
    if len(_chain) >= MAX_INCLUDE_DEPTH:
        raise ConfigError(f"{_chain[0]}: _base_ chain deeper than {MAX_INCLUDE_DEPTH} files; refused")
    size = p.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p}: {size} bytes, above the {MAX_CONFIG_BYTES} a config file may hold; refused")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    data = safe_yaml(text, p)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a config file must hold a mapping, got {type(data).__name__}")
    base = data.pop("_base_", None)
    if base is not None:
        bases = base if isinstance(base, list) else [base]
        merged: dict = {}
        for b in bases:
            merged = merge(merged, read_yaml(_resolve_base(b, p, _trusted), _trusted=_trusted, _chain=(*_chain, p)))
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
        value = safe_yaml(raw, f"--set {key}") if raw.strip() != "" else ""
    except ConfigError as e:
        if "refused" in str(e):
            raise
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
    for name, v in kwargs.items():  # after the schema's own checks, whose messages are more specific
        _check_value(_prefix + name, v)
    return obj


#: keys (by their last name, in any schema) whose numbers must be above 0, or at least 0
_POSITIVE = frozenset({"lr", "batch_size", "sw_batch_size", "img_size", "patch_size", "volume_size",
                       "crop_size", "embed_dim", "chunk_shape", "whole_shape"})
_NON_NEGATIVE = frozenset({"steps", "num_workers", "min_lr", "encoder_lr", "weight_decay", "compression_level"})
#: keys that hold one number per CT axis [x, y, z]
_THREE = frozenset({"volume_size", "whole_shape", "chunk_shape", "spacing_mm", "target_spacing_mm"})


def _numbers(v):
    if isinstance(v, bool):
        return []
    if isinstance(v, (int, float)):
        return [v]
    if isinstance(v, (list, tuple)):
        return [x for item in v for x in _numbers(item)]
    return []


def _check_value(key: str, v) -> None:
    """Load-time value checks: every float finite; sizes, steps and learning rates positive."""
    nums = _numbers(v)
    bad = [x for x in nums if isinstance(x, float) and x != x or x in (float("inf"), float("-inf"))]
    if bad:
        raise ConfigError(f"config key '{key}' must be a finite number, got {bad[0]!r}")
    last = key.rsplit(".", 1)[-1]
    if last in _POSITIVE and any(x <= 0 for x in nums):
        raise ConfigError(f"config key '{key}' must be above 0, got {v!r}")
    if last in _NON_NEGATIVE and any(x < 0 for x in nums):
        raise ConfigError(f"config key '{key}' must be 0 or more, got {v!r}")
    if last in _THREE and isinstance(v, (list, tuple)) and len(v) != 3:
        raise ConfigError(f"config key '{key}' needs 3 numbers [x, y, z], got {len(v)}: {v!r}")


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
    paths = []
    for f in files or ():
        p = Path(f)
        if not p.is_file():
            try:
                p = config_path(f)
            except FvlmError:
                raise ConfigError(f"config file not found: {f}") from None
        paths.append(p.resolve())
    trusted = tuple(dict.fromkeys(p.parent for p in paths))
    for p in paths:
        data = merge(data, read_yaml(p, _trusted=trusted))
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
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(f"# resolved {type(cfg).__name__} written by fvlm\n")
            yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C included: no half-written file left beside
        tmp.unlink(missing_ok=True)
        raise
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
