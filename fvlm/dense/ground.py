"""Phrase grounding (``fvlm dense ground``): heatmap of a text prompt over a CT or an X-ray.

Input images: NIfTI CT (reoriented to RAS+, windowed, resampled to the spacing the
model was trained at) or a PNG/JPEG radiograph (grayscale, resized to the encoder's
input). For each text the command writes ``<slug>_heatmap.png`` (the heatmap alone),
``<slug>_overlay.png`` (on the image; for CT the axial, coronal and sagittal planes
through the heatmap's peak), the raw heatmap (``.nii.gz`` on the CT grid, ``.npy`` for
2D), and ``ground.json`` with the peak position and score per text.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import FvlmError

__all__ = ["load_image", "ground_texts", "save_overlays", "slug"]


def slug(text: str, n: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return (s[:n].rstrip("_") or "prompt")


def load_image(path: str | Path, model, meta: dict) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """-> ``(image in [0, 1], affine or None, info)``; 3D ``(X, Y, Z)`` RAS+ or 2D ``(H, W)``."""
    p = Path(path)
    if not p.exists():
        raise FvlmError(f"image not found: {p}")
    name = p.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        import nibabel as nib
        from scipy import ndimage as ndi

        from ..data import window

        try:
            img = nib.as_closest_canonical(nib.load(str(p)))
        except Exception as e:
            raise FvlmError(f"cannot read NIfTI {p}: {e}") from None
        if len(img.shape) != 3:
            raise FvlmError(f"{p}: expected a 3D CT volume, got shape {img.shape}")
        hu = np.asarray(img.dataobj, dtype=np.float32)
        sp = np.array(img.header.get_zooms()[:3], dtype=float)
        target = np.array(meta.get("spacing_mm") or sp, dtype=float)
        affine = img.affine.copy()
        if not np.allclose(sp, target, atol=1e-3):
            hu = ndi.zoom(hu, sp / target, order=1)
            affine[:3, :3] = affine[:3, :3] @ np.diag(target / sp)
        lo, hi = meta.get("window", [-1150.0, 350.0])
        return window(hu, lo, hi), affine, {"kind": "ct", "spacing_mm": target.tolist(), "shape": list(hu.shape)}
    if name.endswith((".png", ".jpg", ".jpeg")):
        from PIL import Image

        if model.spatial_dims != 2:
            raise FvlmError(f"{p} is a 2D image but the checkpoint holds a 3D model; use a vit2d_* dense model")
        try:
            im = Image.open(p).convert("L")
        except Exception as e:
            raise FvlmError(f"cannot read image {p}: {e}") from None
        h, w = model.encoder.img_size
        orig = im.size
        im = im.resize((w, h), Image.BILINEAR)
        return np.asarray(im, dtype=np.float32) / 255.0, None, {"kind": "xray", "original_size": list(orig[::-1])}
    raise FvlmError(f"{p}: unsupported image type (use .nii/.nii.gz CT or .png/.jpg radiographs)")


def ground_texts(model, info: dict, image: np.ndarray, texts: Sequence[str], text_encoder, eval_cfg) -> np.ndarray:
    """Heatmaps in ``[0, 1]`` for each text, shape ``(K, *image.shape)``."""
    import torch

    from .evaluate import prompt_heatmaps
    from .model import sliding_predict
    from .train import PromptBank

    if model.task != "text":
        raise FvlmError("grounding needs a text-driven dense model (trained with model.head=text)")
    bank = PromptBank(text_encoder, info.get("meta", {}).get("templates", ["{}"]))
    emb = bank(list(texts))
    if image.ndim == 3:
        return prompt_heatmaps(model, image, emb, eval_cfg.overlap, eval_cfg.sw_batch_size)
    x = torch.from_numpy(np.ascontiguousarray(image))[None, None]
    logits = sliding_predict(model, x, tuple(model.encoder.img_size), text=emb, overlap=eval_cfg.overlap)
    return torch.sigmoid(logits[0]).numpy()


def _view(a: np.ndarray, plane: str, idx: int) -> np.ndarray:
    """2D display array, radiological convention (patient right on the viewer's left, anterior/superior up)."""
    if plane == "axial":
        s = a[:, :, idx]
    elif plane == "coronal":
        s = a[:, idx, :]
    else:
        s = a[idx, :, :]
    if plane != "sagittal":
        s = s[::-1, :]
    return s.T


def save_overlays(image: np.ndarray, heat: np.ndarray, text: str, out_dir: Path, affine=None) -> dict:
    """Write heatmap/overlay PNGs (+ raw heatmap) for one text; returns file names and the peak."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    s = slug(text)
    # the peak is searched inside the body (CT): padding at the volume edge is no answer
    if image.ndim == 3:
        from .evaluate import body_mask

        body = body_mask(image)
        search = np.where(body, heat, -np.inf) if body.any() else heat
    else:
        search = heat
    peak = np.unravel_index(int(np.argmax(search)), heat.shape)
    files = {}
    if image.ndim == 3:
        import nibabel as nib

        planes = [("axial", 2), ("coronal", 1), ("sagittal", 0)]
        fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
        fig2, axes2 = plt.subplots(1, 3, figsize=(12, 4.4))
        for (plane, ax_i), ax, ax2 in zip(planes, axes, axes2):
            idx = int(peak[ax_i])
            ax.imshow(_view(image, plane, idx), cmap="gray", origin="lower", vmin=0, vmax=1)
            ax.imshow(_view(heat, plane, idx), cmap="jet", origin="lower", alpha=0.4, vmin=0, vmax=1)
            ax2.imshow(_view(heat, plane, idx), cmap="jet", origin="lower", vmin=0, vmax=1)
            for a in (ax, ax2):
                a.set_title(f"{plane} {idx}")
                a.axis("off")
        for f in (fig, fig2):
            f.suptitle(text)
            f.tight_layout()
        fname = f"{s}_heatmap.nii.gz"
        nib.save(nib.Nifti1Image(heat.astype(np.float32), affine if affine is not None else np.eye(4)),
                 str(out_dir / fname))
        files["heatmap_nifti"] = fname
    else:
        fig, ax = plt.subplots(figsize=(5, 5.3))
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        ax.imshow(heat, cmap="jet", alpha=0.4, vmin=0, vmax=1)
        ax.plot(peak[1], peak[0], "w+", ms=12)
        ax.set_title(text)
        ax.axis("off")
        fig2, ax2 = plt.subplots(figsize=(5, 5.3))
        ax2.imshow(heat, cmap="jet", vmin=0, vmax=1)
        ax2.set_title(text)
        ax2.axis("off")
        fname = f"{s}_heatmap.npy"
        np.save(out_dir / fname, heat.astype(np.float32))
        files["heatmap_array"] = fname
    fig.savefig(out_dir / f"{s}_overlay.png", dpi=100)
    fig2.savefig(out_dir / f"{s}_heatmap.png", dpi=100)
    plt.close(fig)
    plt.close(fig2)
    files["overlay_png"] = f"{s}_overlay.png"
    files["heatmap_png"] = f"{s}_heatmap.png"
    res = {"text": text, "peak_voxel": [int(p) for p in peak], "peak": round(float(heat[peak]), 6),
           "max": round(float(heat.max()), 6), "files": files}
    if affine is not None:
        res["peak_mm_ras"] = [round(float(v), 2) for v in (affine @ np.array([*peak, 1.0]))[:3]]
    return res


def write_ground_json(out_dir: Path, image_path: str, checkpoint: str, info: dict, results: list) -> Path:
    p = out_dir / "ground.json"
    p.write_text(json.dumps({"image": str(image_path), "checkpoint": str(checkpoint), "image_info": info,
                             "results": results}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return p
