"""The training programs (CT pretraining, X-ray MIM, dense heads) share one shape on one engine
(issue 34): data keys under ``data.`` in every program (the old ``train.`` spellings read for one
release with one warning line), the engine never imports a program, the library never imports the
commands or the package root."""
import ast
import logging
from pathlib import Path

import pytest

from fvlm.config import ConfigError, describe, load_config
from fvlm.ct.config import PretrainConfig
from fvlm.dense.config import DenseConfig
from fvlm.xray.config import XrayPretrainConfig

PKG = Path(__file__).resolve().parents[1] / "fvlm"
CONFIGS = PKG.parent / "configs"
PROGRAMS = {"ct": (PretrainConfig, "train"), "dense": (DenseConfig, "dense"), "xray": (XrayPretrainConfig, "xray")}


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_data_keys_sit_under_data_in_every_program(name):
    schema, folder = PROGRAMS[name]
    keys = {r[0]: r[3] for r in describe(schema)}
    assert "data.batch_size" in keys and "data.num_workers" in keys
    for old in ("train.batch_size", "train.num_workers"):   # only as documented old spellings
        assert old not in keys or "deprecated" in keys[old], (old, keys.get(old))
    for path in sorted((CONFIGS / folder).glob("*.yaml")):
        cfg = load_config(schema, base=f"{folder}/{path.name}")
        assert cfg.data.batch_size >= 1, path
        raw = path.read_text(encoding="utf-8")
        train_part = raw.split("\ntrain:", 1)[1].split("\n\n", 1)[0] if "\ntrain:" in raw else ""
        assert "  batch_size:" not in train_part and "  num_workers:" not in train_part, path


@pytest.mark.parametrize("schema, base, old, new, value", [
    (DenseConfig, "dense/default.yaml", "train.batch_size", "data.batch_size", 5),
    (DenseConfig, "dense/seg3d_tiny.yaml", "train.num_workers", "data.num_workers", 3),
    (XrayPretrainConfig, "xray/tiny_cpu.yaml", "train.batch_size", "data.batch_size", 6),
])
def test_old_train_keys_still_work_with_one_warning_naming_the_new_key(caplog, schema, base, old, new, value):
    with caplog.at_level(logging.WARNING, logger="fvlm"):
        cfg = load_config(schema, base=base, sets=[f"{old}={value}"])
    section, name = new.split(".")
    assert getattr(getattr(cfg, section), name) == value
    assert getattr(cfg.train, old.split(".")[1]) is None        # nothing reads the old field
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and old in lines[0] and f"use '{new}'" in lines[0], lines
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fvlm"):
        load_config(schema, base=base, sets=[f"{new}={value}"])      # the new key: no warning
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_an_old_key_keeps_its_checks():
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(DenseConfig, sets=["train.batch_size=0"])
    with pytest.raises(ConfigError, match="data.batch_size"):
        load_config(XrayPretrainConfig, sets=["data.batch_size=0"])


def _imports(path: Path) -> list[tuple[str, tuple[str, ...]]]:
    """``(target module, imported names)`` of every import of ``path`` (function-level ones too)."""
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    pkg = parts[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, ()) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            out.append((target, tuple(a.name for a in node.names)))
    return out


def _modules(top: str) -> list[Path]:
    return sorted((PKG / top).rglob("*.py")) if (PKG / top).is_dir() else [PKG / f"{top}.py"]


@pytest.mark.parametrize("lib", ["engine", "data", "encoders", "models", "losses", "eval", "ct", "dense", "xray"])
def test_no_arrow_from_the_library_up_into_the_commands_or_the_package_root(lib):
    submodules = {p.stem for p in PKG.glob("*.py")} | {p.name for p in PKG.iterdir() if p.is_dir()}
    bad = []
    for path in _modules(lib):
        for target, names in _imports(path):
            if target == "fvlm" and (not names or set(names) - submodules):   # `import fvlm`, `from fvlm import load`
                bad.append((str(path.relative_to(PKG)), target, names))
            up = target.startswith(("fvlm.commands", "fvlm.cli"))
            if up or (target == "fvlm" and {"commands", "cli"} & set(names)):
                bad.append((str(path.relative_to(PKG)), target, names))
    assert not bad, bad


def test_the_engine_never_imports_a_program():
    programs = ("fvlm.ct", "fvlm.dense", "fvlm.xray", "fvlm.demo", "fvlm.train")
    bad = [(str(p.relative_to(PKG)), t) for p in _modules("engine") for t, names in _imports(p)
           if t.startswith(programs) or (t == "fvlm" and {"ct", "dense", "xray", "demo", "train"} & set(names))]
    assert not bad, bad


def test_python_m_fvlm_train_still_starts_the_ct_program():
    import fvlm.ct.pretrain as ct
    import fvlm.train.engine as old_engine
    import fvlm.train.pretrain as old

    assert old is ct and old.main is ct.main
    from fvlm.engine.trainer import Trainer

    assert old_engine.Trainer is Trainer
    src = (PKG / "train" / "__main__.py").read_text(encoding="utf-8")
    assert "from ..ct.pretrain import main" in src
