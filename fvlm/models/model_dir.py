"""The model directory (``fvlm-model-dir`` v1, docs/FORMATS.md "Model directory"), written by ``fvlm export``.

A folder that loads offline and never unpickles::

    DIR/config.json        format, version, model registry name, model config, meta (anatomies,
                           input transform, preprocessing settings, thresholds, ...), text model
    DIR/model.safetensors  every stored tensor of the consolidated checkpoint (float32)
    DIR/text/              optional: the text model's own files (tokenizer, config, safetensors)
    DIR/README.md          model card stub

:func:`read_model_dir` returns the same raw dict as
:func:`fvlm.models.checkpoint.read_consolidated` does for a ``.pt`` file, so every reader
of checkpoints takes either.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from ..errors import FormatError, FvlmError

__all__ = ["DIR_FORMAT", "DIR_VERSION", "CONFIG_NAME", "WEIGHTS_NAME", "TEXT_DIR", "write_model_dir",
           "read_model_dir", "is_model_dir", "model_dir_sha256"]

DIR_FORMAT = "fvlm-model-dir"
DIR_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TEXT_DIR = "text"
THRESHOLDS_NAME = "thresholds.json"

#: text-model files copied by ``--include-text-model`` (no pickled weights: safetensors only)
_TEXT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
               "special_tokens_map.json", "merges.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model")


def is_model_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder holding a model directory's ``config.json``."""
    return (Path(path) / CONFIG_NAME).is_file()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 22), b""):
            h.update(b)
    return h.hexdigest()


def model_dir_sha256(path: str | os.PathLike) -> str:
    """Identity of a model directory: SHA-256 over the hashes of ``config.json`` and the weights.

    Thresholds (``results.json``, ``thresholds.json``) record it like the SHA-256 of a ``.pt``.
    A ``thresholds.json`` written into the folder later does not change it.
    """
    p = Path(path)
    parts = [_sha256(p / CONFIG_NAME), _sha256(p / WEIGHTS_NAME) if (p / WEIGHTS_NAME).is_file() else ""]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _copy_text_model(src: Path, dst: Path) -> list[str]:
    names = [n for n in _TEXT_FILES if (src / n).is_file()]
    if "model.safetensors" not in names:
        raise FvlmError(f"text model {src} has no model.safetensors (only pickled weights?); "
                        "export it without --include-text-model")
    dst.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copy2(src / n, dst / n)
    return names


def write_model_dir(obj: dict, out: str | os.PathLike, *, source: dict | None = None, card: str | None = None,
                    include_text_model: bool = False, extra_meta: dict | None = None) -> Path:
    """Write the raw checkpoint dict ``obj`` (:func:`read_consolidated`) as a model directory.

    ``extra_meta`` is merged over ``obj["meta"]`` (e.g. thresholds from a sidecar);
    ``include_text_model`` copies the text model's files into ``text/`` (needed when its
    weights are not stored in the checkpoint and the receiver has no copy).
    """
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FvlmError(f"--out {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(obj["meta"])
    meta.update(extra_meta or {})
    sd = {k: v.detach().cpu().contiguous() for k, v in obj["state_dict"].items()}
    tmp = out / (WEIGHTS_NAME + ".tmp")
    save_file(sd, str(tmp), metadata={"format": "pt", "fvlm_format": DIR_FORMAT})
    os.replace(tmp, out / WEIGHTS_NAME)
    text = {"weights": meta.get("text_weights", "included"), "identity": meta.get("text_identity") or {},
            "dir": None, "files": []}
    ident_path = (meta.get("text_identity") or {}).get("path")
    if include_text_model:
        if not ident_path or not Path(ident_path).is_dir():
            raise FvlmError("--include-text-model: the checkpoint's text model has no local folder "
                            f"({ident_path or 'built in'}); nothing to copy")
        text["files"] = _copy_text_model(Path(ident_path), out / TEXT_DIR)
        text["dir"] = TEXT_DIR
    doc = {"format": DIR_FORMAT, "version": DIR_VERSION, "model": obj["model"], "config": obj["config"],
           "meta": meta, "anatomies": list(meta.get("anatomies") or []), "embed_dim": meta.get("embed_dim"),
           "preprocess": meta.get("preprocess"), "text": text,
           "weights": {"file": WEIGHTS_NAME, "n_tensors": len(sd), "sha256": _sha256(out / WEIGHTS_NAME)},
           "source": source or {}, "checkpoint_format": {"format": obj.get("format"), "version": obj.get("version")}}
    tmpc = out / (CONFIG_NAME + ".tmp")
    tmpc.write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    os.replace(tmpc, out / CONFIG_NAME)
    if card is not None:
        (out / "README.md").write_text(card, encoding="utf-8")
    return out


def read_model_dir(path: str | os.PathLike) -> dict:
    """Read a model directory -> the raw checkpoint dict (``format: fvlm-model``, ``state_dict``, ...).

    The key ``_text_model_dir`` names ``DIR/text`` when the folder carries its text model.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    cfg_path = p / CONFIG_NAME
    if not cfg_path.is_file():
        raise FvlmError(f"{p}: not a model directory (no {CONFIG_NAME}; written by `fvlm export`)")
    try:
        doc = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != DIR_FORMAT:
        raise FormatError(f"{cfg_path}: not an {DIR_FORMAT} config (format {doc.get('format') if isinstance(doc, dict) else None!r})")
    if int(doc.get("version", -1)) != DIR_VERSION:
        raise FormatError(f"{cfg_path}: {DIR_FORMAT} version {doc.get('version')} is not supported "
                          f"(this fvlm reads version {DIR_VERSION})")
    for key in ("model", "config", "meta"):
        if key not in doc:
            raise FormatError(f"{cfg_path}: no '{key}' key")
    wpath = p / (doc.get("weights") or {}).get("file", WEIGHTS_NAME)
    if not wpath.is_file():
        raise FvlmError(f"{p}: weights file {wpath.name} not found")
    try:
        sd = load_file(str(wpath), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise FormatError(f"{wpath}: not a readable safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    obj = {"format": "fvlm-model", "version": 1, "model": doc["model"], "config": doc["config"],
           "state_dict": sd, "meta": dict(doc["meta"])}
    text_dir = (doc.get("text") or {}).get("dir")
    if text_dir and (p / text_dir / "config.json").is_file():
        obj["_text_model_dir"] = str(p / text_dir)
    return obj
