"""Figures made for people: grounding overlays (CT and X-ray) and MAE reconstruction grids.

Each figure is checked through the matplotlib artists it is built from: titles, colour bar,
orientation and peak markers, captions, and the pixels of the tiles.
"""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from fvlm.dense import ground  # noqa: E402
from fvlm.xray import visualize  # noqa: E402


def _texts(ax, gid=None):
    return [t.get_text() for t in ax.texts if gid is None or t.get_gid() == gid]


def _colorbar_label(fig):
    labels = [ax.get_ylabel() for ax in fig.axes]
    return next((lab for lab in labels if "grounding score" in lab), None)


# --------------------------------------------------------------------------- grounding


def test_prompt_anatomy_picks_the_display_window():
    assert ground.prompt_anatomy("nodule in the right lower lobe") == "lung"
    assert ground.display_window("nodule in the right lower lobe")[0] == "lung"
    assert ground.display_window("hypodense lesion of the liver") == ("soft tissue", (-160.0, 240.0))
    assert ground.display_window("renal cysts")[0] == "soft tissue"
    assert ground.display_window("fracture of the vertebrae")[0] == "bone"
    # "pulmonary artery" names no lung structure (the lexicon's _none), and no other anatomy here
    assert ground.prompt_anatomy("pulmonary artery") is None
    assert ground.display_window("something unheard of")[0] == "soft tissue"


def _ct(shape=(30, 26, 20)):
    """A synthetic CT in fVLM's input window [-1150, 350] HU: air outside, 40 HU tissue inside."""
    hu = np.full(shape, -1000.0, np.float32)
    hu[3:-3, 3:-3, :] = 40.0
    return (hu + 1150.0) / 1500.0


@pytest.mark.parametrize("text,window", [("liver", "soft tissue"), ("nodule in the right lower lobe", "lung")])
def test_ct_grounding_figure_has_its_labels(text, window):
    img = _ct()
    heat = np.zeros(img.shape, np.float32)
    peak = (8, 15, 12)
    heat[peak] = 0.9
    heat[0, 0, 0] = 1.0  # higher, but in the air: not the peak
    aff = np.diag([1.5, 1.5, 3.0, 1.0])
    fig, fig2, info = ground.grounding_figures(img, heat, text, aff, (-1150.0, 350.0))
    try:
        assert info["peak"] == peak and info["window"] == window
        for f, overlay in ((fig, True), (fig2, False)):
            assert text in f._suptitle.get_text()
            label = _colorbar_label(f)
            assert label and "0-1" in label and (("opacity" in label) == overlay)
            panels = [ax for ax in f.axes if ax.get_title()]
            assert [ax.get_title().split()[0] for ax in panels] == ["axial", "coronal", "sagittal"]
            want = {"axial": {"R", "L", "A", "P"}, "coronal": {"R", "L", "S", "I"}, "sagittal": {"A", "P", "S", "I"}}
            # display (col, row) of the peak: x is flipped (patient's right on the left), y flipped in sagittal
            where = {"axial": (img.shape[0] - 1 - peak[0], peak[1]), "coronal": (img.shape[0] - 1 - peak[0], peak[2]),
                     "sagittal": (img.shape[1] - 1 - peak[1], peak[2])}
            for ax in panels:
                plane = ax.get_title().split()[0]
                assert set(_texts(ax, "orientation")) == want[plane]
                marks = [ln for ln in ax.lines if ln.get_gid() == "peak"]
                assert len(marks) == 1
                assert (marks[0].get_xdata()[0], marks[0].get_ydata()[0]) == where[plane]
                assert _texts(ax, "peak_label") == ["peak 0.90"]
        assert window in fig._suptitle.get_text()
        # the overlay: grey image in the prompt's window, heat transparent where it is 0
        axial = fig.axes[0]
        grey, rgba = (im.get_array() for im in axial.get_images())
        tissue = grey[10, 12]  # a 40 HU voxel
        expect = (40 + 160) / 400 if window == "soft tissue" else (40 + 1350) / 1500
        assert float(tissue) == pytest.approx(expect, abs=1e-4)
        assert np.asarray(rgba)[..., 3].min() == 0.0
        col, row = where["axial"]
        assert np.asarray(rgba)[row, col, 3] > 0.7  # opaque at the peak
        assert axial.get_images()[0].get_extent() is not None
    finally:
        plt.close(fig)
        plt.close(fig2)


def test_xray_grounding_figure_has_its_labels():
    img = np.random.default_rng(0).random((40, 40)).astype(np.float32)
    heat = np.zeros((40, 40), np.float32)
    heat[10, 30] = 0.8
    fig, fig2, info = ground.grounding_figures(img, heat, "nodule in the right upper lobe")
    try:
        assert info["peak"] == (10, 30)
        for f in (fig, fig2):
            ax = f.axes[0]
            assert "nodule in the right upper lobe" in ax.get_title()
            assert set(_texts(ax, "orientation")) == {"R", "L"}
            mark = next(ln for ln in ax.lines if ln.get_gid() == "peak")
            assert (mark.get_xdata()[0], mark.get_ydata()[0]) == (30, 10)
            assert _colorbar_label(f)
    finally:
        plt.close(fig)
        plt.close(fig2)


# --------------------------------------------------------------------------- MAE reconstructions


@pytest.fixture(scope="module")
def masked_batch(cxr_samples):
    from fvlm.config import load_config
    from fvlm.xray.batch import XrayCollate
    from fvlm.xray.config import XrayPretrainConfig
    from fvlm.xray.data import XrayDataset

    cfg = load_config(XrayPretrainConfig, sets=["mask.strategy=context", "mask.ratio_inside=0.9",
                                                 "mask.ratio_outside=0.5"])
    ds = XrayDataset(cxr_samples / "images", size=64)
    batch = XrayCollate(cfg.mask, 16, torch.Generator().manual_seed(0))([ds[i] for i in range(3)])
    names = [ds.entries[int(i)].path.stem for i in batch["index"]]
    pred = torch.rand(3, 16, 256, generator=torch.Generator().manual_seed(1))
    return batch, pred, names


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_figure_has_its_labels(masked_batch, norm_pix):
    batch, pred, names = masked_batch
    fig = visualize.reconstruction_figure(batch, pred, (16, 16), norm_pix, "mae", step=7, names=names)
    try:
        assert "step 7" in fig._suptitle.get_text()
        tiles = fig.axes
        assert len(tiles) == 3 * 4
        assert tuple(ax.get_title() for ax in tiles[:4]) == visualize.COLUMN_TITLES["mae"]
        texts = [t.get_text() for t in fig.texts]
        mask = batch["mask"].float()
        inside = batch["inside"]
        for i, name in enumerate(names):
            row = next(t for t in texts if t.startswith(name))
            assert f"hidden {mask[i].mean():.0%}" in row
            assert f"chest {mask[i][inside[i]].mean():.0%}" in row and "outside" in row
        caption = next(t for t in texts if "native resolution" in t)
        assert ("normalised per patch" in caption) == norm_pix and ("raw pixels" in caption) == (not norm_pix)
        assert "blue = hidden" in caption
        # hidden patches in the masked column are the distinct colour; visible ones are the image's grey
        from fvlm.xray.masking import patch_to_pixel_mask

        pix = patch_to_pixel_mask(batch["mask"], (4, 4), (16, 16))[0, 0].numpy()
        masked = np.asarray(tiles[1].get_images()[0].get_array())
        assert np.allclose(masked[pix], visualize.HIDDEN_RGB)
        grey = masked[~pix]
        assert np.allclose(grey[:, 0], grey[:, 1])
        # the reconstruction pasted into the visible patches keeps the input's own pixels there
        pasted = np.asarray(tiles[3].get_images()[0].get_array())[..., 0]
        assert np.allclose(pasted[~pix], batch["image"][0, 0].numpy()[~pix], atol=1e-6)
        # tiles are drawn at 1 px per image pixel (64 px here), not resampled
        fw, fh = fig.get_size_inches() * fig.dpi
        for ax in tiles:
            pos = ax.get_position()
            assert round(pos.width * fw) == 64 and round(pos.height * fh) == 64
    finally:
        plt.close(fig)


def test_gmml_figure_titles(masked_batch, tmp_path):
    batch, pred, names = masked_batch
    b = dict(batch)
    b["corrupted"] = batch["mask"]
    b["input"] = batch["image"]
    p = visualize.save_reconstruction_figure(tmp_path / "g.png", b, pred, (16, 16), False, "gmml", step=3, names=names)
    assert p.is_file()
    fig = visualize.reconstruction_figure(b, pred, (16, 16), False, "gmml", step=3, names=names)
    try:
        assert tuple(ax.get_title() for ax in fig.axes[:4]) == visualize.COLUMN_TITLES["gmml"]
        assert any("corrupted" in t.get_text() and names[0] in t.get_text() for t in fig.texts)
    finally:
        plt.close(fig)
