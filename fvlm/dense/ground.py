"""Phrase grounding (``fvlm dense ground``): heatmap of a text prompt over a CT or an X-ray.

Input images: NIfTI CT (reoriented to RAS+, windowed, resampled to the spacing the
model was trained at) or a PNG/JPEG radiograph (grayscale, resized to the encoder's
input). For each text the command writes ``<slug>_heatmap.png`` (the heatmap alone),
``<slug>_overlay.png`` (on the image; for CT the axial, coronal and sagittal planes
through the heatmap's peak, in a display window chosen for the anatomy the text names),
both with a colour bar, the peak and orientation markers, the raw heatmap (``.nii.gz`` on the CT grid, ``.npy`` for
2D), and ``ground.json`` with the peak position and score per text.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np

import torch

from ..config import read_yaml
from ..data.inputs import grid_regions
from ..errors import FvlmError
from ..models.dense import sliding_predict
from .cases import _resampled_affine, dense_input, hu_int16
from .evaluate import body_mask, prompt_heatmaps
from .task import PromptBank

__all__ = ["load_image", "ground_texts", "save_overlays", "slug", "grounding_figures", "display_window",
           "prompt_anatomy", "DISPLAY_WINDOWS"]


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

        try:
            img = nib.as_closest_canonical(nib.load(str(p)))
        except Exception as e:
            raise FvlmError(f"cannot read NIfTI {p}: {e}") from None
        if len(img.shape) != 3:
            raise FvlmError(f"{p}: expected a 3D CT volume, got shape {img.shape}")
        sp = np.array(img.header.get_zooms()[:3], dtype=float)
        target = np.array(meta.get("spacing_mm") or sp, dtype=float)
        resample = not np.allclose(sp, target, atol=1e-3)
        lo, hi = meta.get("window", [-1150.0, 350.0])
        # the sample path, as training read its volumes: int16 HU resampled to the trained spacing, windowed
        raw = grid_regions(hu_int16(np.asarray(img.dataobj, dtype=np.float32)), None, sp.tolist(),
                           target.tolist() if resample else None)
        image, _ = dense_input(raw, [], (lo, hi))
        affine = _resampled_affine(img.affine, sp, target) if resample else img.affine.copy()
        return image, affine, {"kind": "ct", "spacing_mm": target.tolist(), "shape": list(image.shape),
                               "window_hu": [float(lo), float(hi)]}
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
        # not the CT sample path: a radiograph is an 8-bit 2D image with no HU to window and no stored
        # int16 grid; the 2D dense models train on axial CT slices (the path above), so this resize
        # to the encoder input is the X-ray reader's own
        im = im.resize((w, h), Image.BILINEAR)
        return np.asarray(im, dtype=np.float32) / 255.0, None, {"kind": "xray", "original_size": list(orig[::-1])}
    raise FvlmError(f"{p}: unsupported image type (use .nii/.nii.gz CT or .png/.jpg radiographs)")


def ground_texts(model, info: dict, image: np.ndarray, texts: Sequence[str], text_encoder, eval_cfg) -> np.ndarray:
    """Heatmaps in ``[0, 1]`` for each text, shape ``(K, *image.shape)``."""
    if model.task != "text":
        raise FvlmError("grounding needs a text-driven dense model (trained with model.head=text)")
    bank = PromptBank(text_encoder, info.get("meta", {}).get("templates", ["{}"]))
    emb = bank(list(texts))
    if image.ndim == 3:
        return prompt_heatmaps(model, image, emb, eval_cfg.overlap, eval_cfg.sw_batch_size)
    x = torch.from_numpy(np.ascontiguousarray(image))[None, None]
    logits = sliding_predict(model, x, tuple(model.encoder.img_size), text=emb, overlap=eval_cfg.overlap)
    return torch.sigmoid(logits[0]).numpy()


#: display windows (HU) by the kind of anatomy a prompt names
DISPLAY_WINDOWS = {"lung": (-1350.0, 150.0), "soft tissue": (-160.0, 240.0), "bone": (-450.0, 1050.0)}
#: anatomy id (lexicon) -> display window name; anatomies not listed get the soft-tissue window
_WINDOW_OF = {"lung": "lung", "bone": "bone"}
HEAT_CMAP = "viridis"  # perceptually uniform, and no grey in it: it never looks like tissue
HEAT_LABEL = "grounding score (sigmoid probability, 0-1)"
_lexicon_cache: list | None = None


def _lexicon() -> list[tuple[tuple[str, ...], str]]:
    """(phrase tokens, anatomy id) from ``configs/anatomy/lexicon.yaml``, longest phrase first."""
    global _lexicon_cache
    if _lexicon_cache is None:
        terms = read_yaml("anatomy/lexicon.yaml").get("terms", {})
        pairs = [(tuple(re.findall(r"[a-z0-9]+", str(t).lower())), a) for a, ts in terms.items() for t in ts or []]
        _lexicon_cache = sorted((p for p in pairs if p[0]), key=lambda p: -len(p[0]))
    return _lexicon_cache


def prompt_anatomy(text: str) -> str | None:
    """The anatomy id (fvlm15 lexicon) a prompt names first, or None ("nodule in the right lower lobe" -> lung)."""
    toks = re.findall(r"[a-z0-9]+", text.lower())
    found: list[tuple[int, str]] = []
    taken = [False] * len(toks)
    for phrase, anat in _lexicon():
        n = len(phrase)
        for i in range(len(toks) - n + 1):
            words = toks[i:i + n]
            plural = words[:-1] + [words[-1].rstrip("s")] if words[-1].endswith("s") else None
            if not any(taken[i:i + n]) and (tuple(words) == phrase or (plural and tuple(plural) == phrase)):
                taken[i:i + n] = [True] * n
                if anat != "_none":
                    found.append((i, anat))
    return min(found)[1] if found else None


def display_window(text: str) -> tuple[str, tuple[float, float]]:
    """The CT display window for a prompt: lung window for lung findings, bone for the skeleton,
    soft tissue for every other anatomy (abdominal organs, heart, vessels) and for unknown texts."""
    name = _WINDOW_OF.get(prompt_anatomy(text) or "", "soft tissue")
    return name, DISPLAY_WINDOWS[name]


def _redisplay(image: np.ndarray, window_hu, display) -> np.ndarray:
    """Re-window a model input (``image`` in [0, 1] = HU through ``window_hu``) to the ``display`` HU window.

    HU outside the model's window are clipped there, so a display window wider than it shows
    those voxels at the clip value.
    """
    lo, hi = window_hu
    hu = lo + np.asarray(image, np.float32) * (hi - lo)
    return np.clip((hu - display[0]) / (display[1] - display[0]), 0.0, 1.0)


def _view(a: np.ndarray, plane: str, idx: int) -> np.ndarray:
    """2D display array (origin lower): axial/coronal with the patient's right on the viewer's left,
    sagittal with anterior on the left; anterior (axial) or superior (coronal, sagittal) up."""
    if plane == "axial":
        s = a[:, :, idx]
    elif plane == "coronal":
        s = a[:, idx, :]
    else:
        s = a[idx, :, :]
    return s[::-1, :].T


#: per plane: (axis shown left-right, axis shown bottom-up, marker left, right, bottom, top)
_PLANES = {"axial": (0, 1, "R", "L", "P", "A"), "coronal": (0, 2, "R", "L", "I", "S"),
           "sagittal": (1, 2, "A", "P", "I", "S")}


def _heat_rgba(heat: np.ndarray, max_alpha: float = 0.85) -> np.ndarray:
    """RGBA of a heatmap in [0, 1]: the colour map, with opacity growing linearly with the score."""
    import matplotlib

    h = np.clip(heat, 0.0, 1.0)
    rgba = matplotlib.colormaps[HEAT_CMAP](h)
    rgba[..., 3] = max_alpha * h
    return rgba


def _markers(ax, left: str, right: str, bottom: str | None, top: str | None) -> None:
    import matplotlib.patheffects as pe

    kw = dict(transform=ax.transAxes, color="white", fontsize=11, fontweight="bold", gid="orientation",
              path_effects=[pe.withStroke(linewidth=2.5, foreground="black")])
    ax.text(0.02, 0.5, left, ha="left", va="center", **kw)
    ax.text(0.98, 0.5, right, ha="right", va="center", **kw)
    if bottom:
        ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **kw)
    if top:
        ax.text(0.5, 0.98, top, ha="center", va="top", **kw)


def _peak(ax, col: float, row: float, score: float, shape: tuple[int, int], up: bool = True) -> None:
    """Mark the peak at display (col, row) of a (rows, cols) panel; ``up``: row 0 is at the bottom."""
    ax.plot([col], [row], marker="+", color="red", ms=16, mew=2, gid="peak")
    ax.plot([col], [row], marker="o", mfc="none", color="red", ms=12, mew=1.2)
    near_top = row > 0.8 * shape[0] if up else row < 0.2 * shape[0]
    near_right = col > 0.7 * shape[1]
    dx, dy = (-8 if near_right else 8), (-16 if near_top else 8)
    ax.annotate(f"peak {score:.2f}", (col, row), xytext=(dx, dy), textcoords="offset points", color="red",
                fontsize=8, fontweight="bold", ha="right" if near_right else "left", gid="peak_label")


def _colorbar(fig, axes, overlay: bool) -> None:
    import matplotlib
    from matplotlib.cm import ScalarMappable

    sm = ScalarMappable(norm=matplotlib.colors.Normalize(0, 1), cmap=HEAT_CMAP)
    cb = fig.colorbar(sm, ax=axes, fraction=0.025, pad=0.02)
    cb.set_label(HEAT_LABEL + ("; opacity grows with the score" if overlay else ""), fontsize=8)


def _ct_figure(disp: np.ndarray, heat: np.ndarray, peak, spacing, text: str, subtitle: str, overlay: bool):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.6), layout="constrained")
    shape = heat.shape
    for ax, plane in zip(axes, ("axial", "coronal", "sagittal")):
        ax_lr, ax_bt, left, right, bottom, top = _PLANES[plane]
        through = 3 - ax_lr - ax_bt
        idx = int(peak[through])
        aspect = spacing[ax_bt] / spacing[ax_lr]
        if overlay:
            ax.imshow(_view(disp, plane, idx), cmap="gray", origin="lower", vmin=0, vmax=1, aspect=aspect)
            ax.imshow(_heat_rgba(_view(heat, plane, idx)), origin="lower", aspect=aspect)
        else:
            ax.imshow(_view(heat, plane, idx), cmap=HEAT_CMAP, origin="lower", vmin=0, vmax=1, aspect=aspect)
        _peak(ax, shape[ax_lr] - 1 - peak[ax_lr], peak[ax_bt], float(heat[tuple(peak)]),
              (shape[ax_bt], shape[ax_lr]))
        _markers(ax, left, right, bottom, top)
        ax.set_title(f"{plane} {'xyz'[through]}={idx} (through the peak)", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    _colorbar(fig, axes, overlay)
    fig.suptitle(f"\u201c{text}\u201d\n{subtitle}", fontsize=10)
    return fig


def _xray_figure(image: np.ndarray, heat: np.ndarray, peak, text: str, overlay: bool):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 5.2), layout="constrained")
    if overlay:
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        ax.imshow(_heat_rgba(heat))
    else:
        ax.imshow(heat, cmap=HEAT_CMAP, vmin=0, vmax=1)
    _peak(ax, peak[1], peak[0], float(heat[tuple(peak)]), heat.shape, up=False)
    # a frontal film is viewed as if facing the patient: the patient's right on the viewer's left
    _markers(ax, "R", "L", None, None)
    ax.set_title(f"\u201c{text}\u201d\n{'overlay on the radiograph' if overlay else 'heatmap'}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    _colorbar(fig, [ax], overlay)
    return fig


def _find_peak(image: np.ndarray, heat: np.ndarray) -> tuple[int, ...]:
    """Index of the highest score; in CT inside the body (padding at the volume edge is no answer)."""
    search = heat
    if image.ndim == 3:
        body = body_mask(image)
        search = np.where(body, heat, -np.inf) if body.any() else heat
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(search)), heat.shape))


def grounding_figures(image: np.ndarray, heat: np.ndarray, text: str, affine=None, window_hu=(-1150.0, 350.0)):
    """(overlay figure, heatmap figure, info) of one text, as matplotlib figures.

    CT ``image`` (X, Y, Z) RAS+ in [0, 1] through ``window_hu`` (the model's input): three planes
    through the peak, in the display window chosen for the prompt's anatomy
    (:func:`display_window`), voxel spacing from ``affine``. 2D: the radiograph.
    Both figures carry the colour bar, the peak and orientation markers.
    """
    import matplotlib

    matplotlib.use("Agg")
    peak = _find_peak(image, heat)
    info = {"peak": peak}
    if image.ndim == 3:
        wname, win = display_window(text)
        win_used = window_hu if window_hu is not None else (-1150.0, 350.0)
        disp = _redisplay(image, win_used, win)
        spacing = np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0) if affine is not None else np.ones(3)
        sub = f"{wname} window [{win[0]:.0f}, {win[1]:.0f}] HU"
        if win[0] < win_used[0] or win[1] > win_used[1]:
            sub += f" (the model saw [{win_used[0]:.0f}, {win_used[1]:.0f}] HU; beyond it clipped)"
        info.update(window=wname, window_hu=[float(win[0]), float(win[1])])
        fig = _ct_figure(disp, heat, peak, spacing, text, "overlay, " + sub, True)
        fig2 = _ct_figure(disp, heat, peak, spacing, text, "heatmap alone", False)
    else:
        fig = _xray_figure(image, heat, peak, text, True)
        fig2 = _xray_figure(image, heat, peak, text, False)
    return fig, fig2, info


def save_overlays(image: np.ndarray, heat: np.ndarray, text: str, out_dir: Path, affine=None,
                  window_hu=None) -> dict:
    """Write heatmap/overlay PNGs (+ raw heatmap) for one text; returns file names and the peak.

    ``window_hu``: the HU window the CT ``image`` was mapped to [0, 1] with (default fVLM's
    [-1150, 350]); the figure re-windows it for the prompt's anatomy.
    """
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    s = slug(text)
    fig, fig2, finfo = grounding_figures(image, heat, text, affine, window_hu)
    peak = finfo["peak"]
    files = {}
    if image.ndim == 3:
        import nibabel as nib

        fname = f"{s}_heatmap.nii.gz"
        nib.save(nib.Nifti1Image(heat.astype(np.float32), affine if affine is not None else np.eye(4)),
                 str(out_dir / fname))
        files["heatmap_nifti"] = fname
    else:
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
    if "window" in finfo:
        res["display_window"] = {"name": finfo["window"], "hu": finfo["window_hu"]}
    if affine is not None:
        res["peak_mm_ras"] = [round(float(v), 2) for v in (affine @ np.array([*peak, 1.0]))[:3]]
    return res


def write_ground_json(out_dir: Path, image_path: str, checkpoint: str, info: dict, results: list) -> Path:
    p = out_dir / "ground.json"
    p.write_text(json.dumps({"image": str(image_path), "checkpoint": str(checkpoint), "image_info": info,
                             "results": results}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return p
