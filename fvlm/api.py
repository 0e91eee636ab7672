"""Use a trained model from Python: ``model = fvlm.load(path)``, then embed, predict, compare with text.

Everything goes through the code paths of the command-line tools, so the numbers agree:
a scan is preprocessed by ``preprocess.writer.case_record`` (what ``fvlm preprocess`` runs
per case) with the training shards' settings that the checkpoint carries, turned into model
inputs by the checkpoint's own transform (``fvlm.data.ct.make_batch_fn(meta["data"])``),
and scored like ``fvlm predict`` / ``fvlm zeroshot`` (``fvlm.eval.predict``). Nothing is
downloaded and nothing is unpickled.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .devices import to_device
from .errors import FvlmError
from .eval import loading
from .eval.loading import checkpoint_sha256, load_taxonomy, taxonomy_name
from .eval.predict import (Scoring, preprocess_scan, prompt_table, resolve_preprocess_config, score_embeddings,
                           scoring_for, scoring_from_meta, thresholds_sidecar)
from .eval.prompts import encode_texts, model_logit_scale
from .models.checkpoint import load_consolidated

__all__ = ["load", "Model", "Embedding", "Prediction"]

GLOBAL = "global"


@dataclass
class Embedding:
    """Image embeddings of one scan, L2-normalised, in the model's shared space.

    Attributes:
        global_: ``(E,)`` whole-scan embedding (None for a model trained without it).
        anatomies: ``{anatomy id: (E,)}`` for every anatomy of the model (absent ones too:
            their vector is pooled over all tokens and means nothing; check ``present``).
        present: ``{anatomy id: bool}``: the anatomy has a mask in the scan.
        case_id: the scan's id (file name, or the shard's case id).
    """
    global_: np.ndarray | None
    anatomies: dict[str, np.ndarray]
    present: dict[str, bool]
    case_id: str = ""

    def vector(self, anatomy: str | None = None) -> np.ndarray:
        """The ``(E,)`` vector of ``anatomy`` (None = global)."""
        if anatomy is None:
            if self.global_ is None:
                raise FvlmError("this model has no global embedding; name an anatomy")
            return self.global_
        if anatomy not in self.anatomies:
            raise FvlmError(f"unknown anatomy {anatomy!r}; the model knows {', '.join(self.anatomies)}")
        return self.anatomies[anatomy]

    def as_dict(self) -> dict[str, np.ndarray]:
        """``{"global": (E,), anatomy: (E,), ...}`` (the keys of ``encode_image``)."""
        out = dict(self.anatomies)
        if self.global_ is not None:
            out[GLOBAL] = self.global_
        return out


@dataclass
class Prediction:
    """Zero-shot diagnosis scores of one scan (the rows ``fvlm predict --json`` prints).

    ``rows``: one dict per diagnosis: ``id``, ``name``, ``anatomy``, ``score`` in [0, 1],
    ``threshold`` (None without tuned thresholds), ``call`` (``positive``/``negative``/None)
    and ``anatomy_present``.
    """
    rows: list[dict]
    taxonomy: str
    thresholds_source: str
    scoring: dict = field(default_factory=dict)
    case_id: str = ""

    @property
    def scores(self) -> dict[str, float]:
        """``{diagnosis id: score}``."""
        return {r["id"]: r["score"] for r in self.rows}

    @property
    def thresholds(self) -> dict[str, float | None]:
        """``{diagnosis id: threshold or None}``."""
        return {r["id"]: r["threshold"] for r in self.rows}

    @property
    def calls(self) -> dict[str, str | None]:
        """``{diagnosis id: "positive" | "negative" | None}`` (None: no threshold, or organ not in the scan)."""
        return {r["id"]: r["call"] for r in self.rows}

    def positives(self) -> list[str]:
        """Diagnosis ids called positive."""
        return [r["id"] for r in self.rows if r["call"] == "positive"]

    def to_dict(self) -> dict:
        """A JSON-ready mapping."""
        return {"case_id": self.case_id, "taxonomy": self.taxonomy, "thresholds_source": self.thresholds_source,
                "scoring": dict(self.scoring), "predictions": [dict(r) for r in self.rows]}


def _positive_int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise FvlmError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


def _torch_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if str(dtype) not in names:
        raise FvlmError(f"dtype {dtype!r}: use float32, bfloat16 or float16")
    return names[str(dtype)]


def _is_batch(x) -> bool:
    return isinstance(x, (list, tuple))


def _check_device(device) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (a GPU that exists), else a one-line :class:`FvlmError`."""
    if not isinstance(device, str):
        raise FvlmError(f"device must be a name such as 'cpu', 'cuda' or 'cuda:0', got {type(device).__name__}")
    if device == "auto":
        return device
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise FvlmError(f"device {device!r} is not a device name: use auto, cpu, cuda or cuda:N") from None
    if d.type not in ("cpu", "cuda"):
        raise FvlmError(f"device {device!r}: fvlm runs on cpu or cuda")
    if d.type == "cuda" and d.index is not None and torch.cuda.is_available() \
            and d.index >= torch.cuda.device_count():
        raise FvlmError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _check_image_arg(x, what: str) -> None:
    """A path, nibabel image or numeric array; anything else is a one-line :class:`FvlmError`."""
    if x is None:
        raise FvlmError(f"{what} is None: pass a NIfTI path, a DICOM folder, a nibabel image or an (X, Y, Z) array")
    if isinstance(x, (str, os.PathLike)) or hasattr(x, "affine") and hasattr(x, "dataobj"):
        return
    if isinstance(x, (bytes, bytearray)):
        raise FvlmError(f"{what} is bytes: pass a path (str) or an array")
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.dtype.kind not in "biuf":
        got = f"an array of dtype {arr.dtype}" if arr is not None and isinstance(x, np.ndarray) else type(x).__name__
        raise FvlmError(f"{what}: expected a NIfTI path, a nibabel image or a numeric (X, Y, Z) array, got {got}")


def _check_texts(texts) -> list[str]:
    """``texts`` as a list of valid Unicode strings, or a one-line :class:`FvlmError`."""
    if texts is None:
        raise FvlmError("texts is None: pass a string or a list of strings")
    if isinstance(texts, (bytes, bytearray)):
        raise FvlmError("texts is bytes: decode it to str first (e.g. .decode('utf-8'))")
    if isinstance(texts, str):
        texts = [texts]
    elif isinstance(texts, (list, tuple)):
        texts = list(texts)
    else:
        raise FvlmError(f"texts must be a string or a list of strings, got {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise FvlmError(f"texts[{i}] is {type(t).__name__}, not a string")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as e:
            raise FvlmError(f"texts[{i}] is not valid Unicode (a lone surrogate at character {e.start})") from None
    return texts


class Model:
    """A trained fvlm model ready for inference; build it with :func:`load`.

    Attributes:
        anatomies: anatomy ids of the per-anatomy embeddings, in model order.
        names: ``anatomies`` plus ``"global"`` when the model has a global embedding.
        embed_dim: size E of every embedding.
        meta: the checkpoint's metadata (``docs/FORMATS.md`` "Checkpoint").
        device: where the model runs (``"cpu"``, ``"cuda"``, ...).
        batch_size: default number of scans per image forward.
    """

    def __init__(self, net, meta: dict, make_batch, source: str | os.PathLike, device: str,
                 preprocess_config=None, batch_size: int = 8):
        self.net = net
        self.meta = dict(meta)
        self._make_batch = make_batch
        self.source = Path(source)
        self.device = device
        self.batch_size = int(batch_size)
        self._pcfg_files = preprocess_config
        self._pcfg: dict = {}
        self._prompts: dict = {}
        self._sha = None

    # ------------------------------------------------------------------ description
    @property
    def anatomies(self) -> list[str]:
        """Anatomy ids of the per-anatomy embeddings, in model order."""
        return list(getattr(self.net, "anatomies", []) or [])

    @property
    def names(self) -> list[str]:
        """Embedding keys: ``anatomies`` plus ``"global"`` when the model has it."""
        return list(getattr(self.net, "names", []) or [])

    @property
    def embed_dim(self) -> int:
        """Size E of every embedding."""
        return int(self.meta.get("embed_dim") or self.net.cfg.embed_dim)

    def __repr__(self) -> str:
        return (f"fvlm.Model({str(self.source)!r}, {len(self.anatomies)} anatomies, embed_dim={self.embed_dim}, "
                f"device={self.device!r})")

    def sha256(self) -> str:
        """Identity of the checkpoint (what ``results.json`` and thresholds record)."""
        if self._sha is None:
            self._sha = checkpoint_sha256(str(self.source))
        return self._sha

    def preprocess_config(self, have_mask: bool = True):
        """The ``PreprocessConfig`` scans are preprocessed with (the training shards' settings
        from ``meta["preprocess"]``; the defaults, with a warning, for older checkpoints)."""
        if have_mask not in self._pcfg:
            self._pcfg[have_mask] = resolve_preprocess_config(self.meta, self._pcfg_files, self.names, have_mask)
        return self._pcfg[have_mask][0]

    # ------------------------------------------------------------------ image side
    def preprocess(self, image, mask=None, *, affine=None, mask_dir=None, case_id: str | None = None):
        """One scan -> ``CaseRecord`` (the record ``fvlm preprocess`` would store in a shard).

        Args:
            image: NIfTI path, DICOM folder, nibabel image, or ``(X, Y, Z)`` array of HU with ``affine``.
            mask: multilabel TotalSegmentator mask: a path, nibabel image, or array on the image's grid;
                None runs TotalSegmentator when its weights are found (else a one-line error).
            affine: 4x4 voxel-to-world matrix (mm, nibabel's RAS+ world) of an array ``image``.
            mask_dir: folder of per-class masks ``<class>.nii.gz`` instead of ``mask``.
        """
        _check_image_arg(image, "image")
        if mask is not None:
            _check_image_arg(mask, "mask")
        pcfg = self.preprocess_config(mask is not None or mask_dir is not None)
        return preprocess_scan(image, mask, pcfg, affine=affine, mask_dir=mask_dir, case_id=case_id)

    def embed_records(self, records: Sequence, batch_size: int | None = None) -> list[Embedding]:
        """Embeddings of preprocessed ``CaseRecord`` s (from :meth:`preprocess` or a ``ShardDataset``),
        ``batch_size`` records per image forward."""
        bs = _positive_int(batch_size or self.batch_size, "batch_size")
        out: list[Embedding] = []
        if records is None or isinstance(records, (str, bytes)):
            raise FvlmError("records must be a list of CaseRecord (from Model.preprocess or a ShardDataset)")
        records = list(records)
        for i, r in enumerate(records):
            if not hasattr(r, "case_id") or not hasattr(r, "present"):
                raise FvlmError(f"records[{i}] is {type(r).__name__}, not a CaseRecord")
        with torch.inference_mode():
            for i in range(0, len(records), bs):
                chunk = records[i:i + bs]
                enc = self.net.encode_image(self._make_batch(chunk))
                arr = {k: v.detach().float().cpu().numpy() for k, v in enc.items()}
                for j, rec in enumerate(chunk):
                    pres = dict(getattr(rec, "present", {}) or {})
                    out.append(Embedding(
                        global_=arr[GLOBAL][j] if GLOBAL in arr else None,
                        anatomies={a: arr[a][j] for a in self.anatomies if a in arr},
                        present={a: bool(pres.get(a, False)) for a in self.anatomies},
                        case_id=str(getattr(rec, "case_id", ""))))
        return out

    def embed(self, image, mask=None, *, affine=None, mask_dir=None, batch_size: int | None = None):
        """Global and per-anatomy embeddings of a scan (or a list of scans).

        ``image``/``mask``/``affine``/``mask_dir`` as in :meth:`preprocess`; lists of images
        (and of masks, aligned) give a list of :class:`Embedding`, ``batch_size`` scans per forward.
        A :class:`Embedding` equals the suite's cached embedding of the same scan in the shards.
        """
        if _is_batch(image):
            masks = list(mask) if _is_batch(mask) else [mask] * len(image)
            if len(masks) != len(image):
                raise FvlmError(f"{len(image)} images but {len(masks)} masks")
            recs = [self.preprocess(im, m, affine=affine, mask_dir=mask_dir) for im, m in zip(image, masks)]
            return self.embed_records(recs, batch_size)
        return self.embed_records([self.preprocess(image, mask, affine=affine, mask_dir=mask_dir)], 1)[0]

    # ------------------------------------------------------------------ zero-shot
    def _scoring(self, thresholds):
        if thresholds is not None and not isinstance(thresholds, (str, os.PathLike, dict)):
            raise FvlmError(f"thresholds must be a results.json of `fvlm zeroshot` (a path or its mapping), "
                            f"got {type(thresholds).__name__}")
        if isinstance(thresholds, dict) and not isinstance(thresholds.get("zeroshot"), dict):
            raise FvlmError("thresholds mapping is not a results.json of `fvlm zeroshot` (no 'zeroshot' section "
                            "with diagnoses and their thresholds)")
        if thresholds is None and not thresholds_sidecar(self.source).is_file():
            return scoring_from_meta(self.meta) or Scoring()
        return scoring_for(self.source, self.meta, self.sha256(), thresholds)

    def _taxonomy(self, taxonomy):
        name = taxonomy_name(taxonomy, self.meta)
        key = ("tax", name)
        if key not in self._prompts:
            self._prompts[key] = load_taxonomy(name)
        return name, self._prompts[key]

    def predict(self, image, mask=None, taxonomy: str | None = None, *, thresholds=None, affine=None,
                mask_dir=None):
        """Zero-shot diagnosis scores, thresholds and calls: the numbers of ``fvlm predict``.

        Args:
            image, mask, affine, mask_dir: as in :meth:`preprocess`; ``image`` may also be an
                :class:`Embedding` (already embedded) or a list of either (-> list of results).
            taxonomy: ``fvlm54``, ``ctrate18`` or a taxonomy YAML (None: the checkpoint's, else fvlm54).
            thresholds: a ``results.json`` (path or mapping) of ``fvlm zeroshot`` for this checkpoint;
                None: the checkpoint's thresholds sidecar, else the thresholds it carries, else none.
        Returns a :class:`Prediction`.
        """
        if _is_batch(image):
            masks = list(mask) if _is_batch(mask) else [mask] * len(image)
            if len(masks) != len(image):
                raise FvlmError(f"{len(image)} images but {len(masks)} masks")
            return [self.predict(im, m, taxonomy, thresholds=thresholds, affine=affine, mask_dir=mask_dir)
                    for im, m in zip(image, masks)]
        emb = image if isinstance(image, Embedding) else self.embed(image, mask, affine=affine, mask_dir=mask_dir)
        scoring = self._scoring(thresholds)
        name, tax = self._taxonomy(taxonomy)
        key = (name, scoring.rule, scoring.prompts, scoring.logit_scale, scoring.clip_baseline)
        if key not in self._prompts:
            with torch.inference_mode():
                self._prompts[key] = prompt_table(self.net, tax, scoring, emb.as_dict())
        rows = score_embeddings({k: v[None] for k, v in emb.as_dict().items()}, emb.present, self._prompts[key],
                                scoring)
        if not rows:
            raise FvlmError(f"no diagnosis of taxonomy {name!r} can be scored by this model")
        return Prediction(rows, name, scoring.source, {"rule": scoring.rule, "prompts": scoring.prompts,
                                                       "logit_scale": scoring.logit_scale,
                                                       "clip_baseline": scoring.clip_baseline}, emb.case_id)

    # ------------------------------------------------------------------ text side
    def embed_text(self, texts: str | Sequence[str], anatomy: str | None = None) -> np.ndarray:
        """L2-normalised text embeddings ``(N, E)`` in ``anatomy``'s space (None = the global one)."""
        texts = _check_texts(texts)
        if anatomy is not None and anatomy not in self.anatomies:
            raise FvlmError(f"unknown anatomy {anatomy!r}; the model knows {', '.join(self.anatomies)}")
        if not texts:
            return np.zeros((0, self.embed_dim), np.float32)
        with torch.inference_mode():
            return encode_texts(self.net, texts, anatomy)[0]

    def similarity(self, image_or_embedding, texts: str | Sequence[str], anatomy: str | None = None,
                   mask=None, affine=None) -> np.ndarray:
        """Cosine similarities ``(T,)`` between a scan and free-text prompts in ``anatomy``'s space.

        ``image_or_embedding``: an :class:`Embedding`, an ``(E,)`` vector, or any image
        :meth:`embed` takes (then ``mask``/``affine`` are used). ``anatomy`` None = global.
        Multiply by ``logit_scale`` and softmax over prompts for CLIP-style probabilities.
        """
        x = image_or_embedding
        if isinstance(x, np.ndarray) and x.ndim == 1:
            if x.dtype.kind not in "biuf" or not np.isfinite(x).all():
                raise FvlmError(f"the embedding vector must hold finite numbers (dtype {x.dtype})")
            vec = x.astype(np.float32)
        else:
            emb = x if isinstance(x, Embedding) else self.embed(x, mask, affine=affine)
            vec = emb.vector(anatomy)
        t = self.embed_text(texts, anatomy)
        if t.shape[1] != vec.shape[0]:
            raise FvlmError(f"embedding size {vec.shape[0]} does not match the model's {t.shape[1]}")
        return t @ vec

    @property
    def logit_scale(self) -> float:
        """The learned similarity scale (1 / temperature)."""
        return float(model_logit_scale(self.net))


def load(path: str | os.PathLike, *, device: str = "auto", dtype=None, batch_size: int = 8,
         text_model_dir: str | os.PathLike | None = None, preprocess_config: Sequence[str] | None = None) -> Model:
    """Load a consolidated checkpoint (``model.pt`` of ``fvlm pretrain``) or a model directory
    (``fvlm export``) -> :class:`Model`.

    Args:
        path: the file or directory.
        device: ``auto`` (a GPU when present), ``cpu``, ``cuda``, ``cuda:1``, ...
        dtype: weights' type: None/``float32`` (default), ``bfloat16`` or ``float16`` (GPU).
        batch_size: default scans per image forward in :meth:`Model.embed` of a list.
        text_model_dir: where to read an external (not stored) text encoder from.
        preprocess_config: preprocess YAML file(s) overriding the checkpoint's settings.

    Never touches the network (``HF_HUB_OFFLINE``) and never unpickles.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    if not isinstance(path, (str, os.PathLike)):
        raise FvlmError(f"path must be a checkpoint file or model directory, got {type(path).__name__}")
    batch_size = _positive_int(batch_size, "batch_size")
    loading.check_checkpoint_path(str(path))
    dev = loading.pick_device(_check_device(device))
    net, meta = load_consolidated(path, text_model_dir=text_model_dir)
    td = _torch_dtype(dtype)
    net = net.to(dev) if td is None else net.to(dev, dtype=td)
    net.eval()
    fn, _ = loading.batch_function(net, meta)

    def make_batch(records):
        return to_device(fn(records), dev)

    return Model(net, meta, make_batch, path, dev, preprocess_config, batch_size)
