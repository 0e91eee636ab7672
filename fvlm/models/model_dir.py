"""The model directory (``fvlm-model-dir`` v1, docs/FORMATS.md "Model directory"), written by ``fvlm export``.

A folder that loads offline and never unpickles::

    DIR/config.json        format, version, model registry name, model config, meta (anatomies,
                           input transform, preprocessing settings, thresholds, ...), text model
    DIR/model.safetensors  every stored tensor of the consolidated checkpoint (float32)
    DIR/text/              optional: the text model's own files (tokenizer, config, safetensors)
    DIR/README.md          model card stub
    DIR/.fvlm-export       marker: the files ``fvlm export`` wrote (a re-export may replace only those)

:func:`read_model_dir` returns the same raw dict as
:func:`fvlm.models.checkpoint.read_consolidated` does for a ``.pt`` file, so every reader
of checkpoints takes either.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from ..errors import FormatError, FvlmError, check_format
from ..hashing import file_sha256

__all__ = ["DIR_FORMAT", "DIR_VERSION", "CONFIG_NAME", "WEIGHTS_NAME", "TEXT_DIR", "write_model_dir", "aside_name",
           "check_export_target",
           "read_model_dir", "is_model_dir", "model_dir_sha256"]

DIR_FORMAT = "fvlm-model-dir"
DIR_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TEXT_DIR = "text"
THRESHOLDS_NAME = "thresholds.json"
MARKER_NAME = ".fvlm-export"

#: text-model files copied by ``--include-text-model`` (no pickled weights: safetensors only)
_TEXT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
               "special_tokens_map.json", "merges.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model")


def is_model_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder holding a model directory's ``config.json``."""
    return (Path(path) / CONFIG_NAME).is_file()


def model_dir_sha256(path: str | os.PathLike) -> str:
    """Identity of a model directory: SHA-256 over the hashes of ``config.json`` and the weights.

    Thresholds (``results.json``, ``thresholds.json``) record it like the SHA-256 of a ``.pt``.
    A ``thresholds.json`` written into the folder later does not change it.
    """
    p = Path(path)
    parts = [file_sha256(p / CONFIG_NAME), file_sha256(p / WEIGHTS_NAME) if (p / WEIGHTS_NAME).is_file() else ""]
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


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(root: Path) -> None:
    """Give every file and folder under ``root`` the modes a plain ``open``/``mkdir`` would.

    ``tempfile.mkdtemp`` makes 0700 folders and safetensors writes 0600 files; a folder that is
    meant to be shared must be readable as the user's umask allows.
    """
    mask = _umask()
    for d, dirs, files in os.walk(root):
        os.chmod(d, 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(d, f), 0o666 & ~mask)


def _written_by_export(out: Path) -> tuple[bool, str | None]:
    """``(True, None)`` when ``out`` holds only what an earlier ``fvlm export`` wrote there,
    else ``(False, first foreign entry)``."""
    marker = out / MARKER_NAME
    try:
        doc = json.loads(marker.read_text(encoding="utf-8"))
        files = set(doc["files"]) if doc.get("format") == DIR_FORMAT else None
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        files = None
    if files is None:
        return False, None
    for entry in sorted(os.listdir(out)):
        if entry != MARKER_NAME and entry not in files:
            return False, entry
    return True, None


def check_export_target(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an ``--out`` that holds anything ``fvlm export`` did not write (unless ``overwrite``).

    An empty or missing folder, or one an earlier export wrote and nobody added to, is fine.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FvlmError(f"--out {out}: exists and is not a directory")
    if not out.is_dir() or overwrite or not any(out.iterdir()):
        return out
    ours, foreign = _written_by_export(out)
    if not ours:
        what = f"it holds {foreign}, which" if foreign else "it has no .fvlm-export marker, so it"
        raise FvlmError(f"--out {out}: a non-empty folder that `fvlm export` did not write ({what} would be "
                        "replaced); choose an empty or new folder, or pass --overwrite to move it aside")
    return out


def aside_name(out: str | os.PathLike) -> Path:
    """Where ``--overwrite`` keeps a folder ``fvlm export`` did not write: ``<out>.replaced-<time>``."""
    out = Path(out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    p, k = out.with_name(f"{out.name}.replaced-{stamp}"), 1
    while p.exists():
        p, k = out.with_name(f"{out.name}.replaced-{stamp}-{k}"), k + 1
    return p


def write_model_dir(obj: dict, out: str | os.PathLike, *, source: dict | None = None, card: str | None = None,
                    include_text_model: bool = False, extra_meta: dict | None = None,
                    extra_files: dict[str, str] | None = None, overwrite: bool = False,
                    aside: str | os.PathLike | None = None) -> Path:
    """Write the raw checkpoint dict ``obj`` (:func:`read_consolidated`) as a model directory.

    ``extra_meta`` is merged over ``obj["meta"]`` (e.g. thresholds from a sidecar);
    ``include_text_model`` copies the text model's files into ``text/`` (needed when its
    weights are not stored in the checkpoint and the receiver has no copy); ``extra_files``
    ``{name: text}`` are written beside (e.g. ``results.json``).

    The folder is built next to ``out`` and renamed into place, so ``out`` is never half
    written. An existing ``out`` that an earlier export wrote is replaced; any other non-empty
    one is refused unless ``overwrite``, and then moved aside whole (to ``aside``, default
    :func:`aside_name`), never deleted. Files get the user's umask.
    """
    out = check_export_target(out, overwrite)
    foreign = out.is_dir() and any(out.iterdir()) and not _written_by_export(out)[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    old = None
    try:
        _fill_model_dir(obj, tmp, source=source, card=card, include_text_model=include_text_model,
                        extra_meta=extra_meta, extra_files=extra_files)
        _apply_umask(tmp)
        if out.exists():
            if foreign:
                old = Path(aside) if aside is not None else aside_name(out)
            else:
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
                os.rmdir(old)
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not out.exists():  # put the old folder back
            os.replace(old, out)
        raise
    if old is not None and not foreign:
        shutil.rmtree(old, ignore_errors=True)
    return out


def _fill_model_dir(obj: dict, out: Path, *, source, card, include_text_model, extra_meta, extra_files) -> None:
    from safetensors.torch import save_file

    meta = dict(obj["meta"])
    meta.update(extra_meta or {})
    sd = {k: v.detach().cpu().contiguous() for k, v in obj["state_dict"].items()}
    save_file(sd, str(out / WEIGHTS_NAME), metadata={"format": "pt", "fvlm_format": DIR_FORMAT})
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
           "weights": {"file": WEIGHTS_NAME, "n_tensors": len(sd), "sha256": file_sha256(out / WEIGHTS_NAME)},
           "source": source or {}, "checkpoint_format": {"format": obj.get("format"), "version": obj.get("version")}}
    (out / CONFIG_NAME).write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    if card is not None:
        (out / "README.md").write_text(card, encoding="utf-8")
    for name, body in (extra_files or {}).items():
        (out / name).write_text(body, encoding="utf-8")
    files = sorted(os.listdir(out))
    (out / MARKER_NAME).write_text(json.dumps({"format": DIR_FORMAT, "files": files}) + "\n", encoding="utf-8")


def _config_doc(cfg_path: Path) -> dict:
    """``config.json`` of a model directory, its fields checked for type (one-line :class:`FormatError`)."""
    try:
        doc = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{cfg_path}: not valid JSON ({e})") from None
    check_format(doc, DIR_FORMAT, DIR_VERSION, cfg_path, what=f"an {DIR_FORMAT} config")
    for key, typ in (("model", str), ("config", dict), ("meta", dict), ("weights", dict)):
        if not isinstance(doc.get(key), typ):
            raise FormatError(f"{cfg_path}: '{key}' must be a {'string' if typ is str else 'mapping'}"
                              + (" (missing)" if key not in doc else f", not {type(doc[key]).__name__}"))
    w = doc["weights"]
    if not isinstance(w.get("file"), str) or not w["file"]:
        raise FormatError(f"{cfg_path}: weights.file must name the weights file")
    sha = w.get("sha256")
    if not isinstance(sha, str) or len(sha) != 64:
        raise FormatError(f"{cfg_path}: weights.sha256 is missing or malformed; the weights cannot be verified "
                          "(re-export the model with `fvlm export`)")
    if not isinstance(doc.get("text") or {}, dict):
        raise FormatError(f"{cfg_path}: 'text' must be a mapping")
    # the copies a reader sees (top level, meta) must say what the model is (config)
    for key in ("anatomies", "embed_dim"):
        truth = doc["config"].get(key)
        for where, holder in (("", doc), ("meta.", doc["meta"])):
            if key in holder and truth is not None and holder[key] != truth:
                raise FormatError(f"{cfg_path}: {where}{key} {holder[key]!r} disagrees with config.{key} "
                                  f"{truth!r} (edited by hand?); refused")
    return doc


def _inside(root: Path, name: str, what: str, where: Path) -> Path:
    """``root/name`` resolved, refused unless it stays inside ``root`` (no ``..``, absolute paths or links out)."""
    p = (root / name).resolve()
    if not p.is_relative_to(root.resolve()):
        raise FormatError(f"{where}: {what} {name!r} lies outside the model directory; refused")
    return p


def read_model_dir(path: str | os.PathLike) -> dict:
    """Read a model directory -> the raw checkpoint dict (``format: fvlm-model``, ``state_dict``, ...).

    The weights file must lie inside the folder and match the SHA-256 that ``config.json``
    records. The key ``_text_model_dir`` names ``DIR/text`` when the folder carries its text model.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as load_bytes

    p = Path(path)
    cfg_path = p / CONFIG_NAME
    if not cfg_path.is_file():
        raise FvlmError(f"{p}: not a model directory (no {CONFIG_NAME}; written by `fvlm export`)")
    doc = _config_doc(cfg_path)
    wpath = _inside(p, doc["weights"]["file"], "weights file", cfg_path)
    if not wpath.is_file():
        raise FvlmError(f"{p}: weights file {doc['weights']['file']} not found")
    data = wpath.read_bytes()
    if hashlib.sha256(data).hexdigest() != doc["weights"]["sha256"]:
        raise FormatError(f"{wpath}: SHA-256 does not match the one config.json records (corrupted or "
                          "replaced weights); refused")
    try:
        sd = load_bytes(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise FormatError(f"{wpath}: not a readable safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    del data
    obj = {"format": "fvlm-model", "version": 1, "model": doc["model"], "config": doc["config"],
           "state_dict": sd, "meta": dict(doc["meta"])}
    text_dir = (doc.get("text") or {}).get("dir")
    if text_dir:
        if not isinstance(text_dir, str):
            raise FormatError(f"{cfg_path}: text.dir must be a folder name")
        tdir = _inside(p, text_dir, "text model folder", cfg_path)
        if (tdir / "config.json").is_file():
            obj["_text_model_dir"] = str(tdir)
    return obj
