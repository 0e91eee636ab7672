"""Geometry fast paths against MONAI and nibabel; HU diagnosis on real CT with known faults."""
import numpy as np
import pytest

from preprocess.crop import center_fit, crop_anatomy, window
from preprocess.errors import CaseError
from preprocess.geometry import check_affine, resample, resampled_shape, to_canonical
from preprocess.hu import apply_hu_policy
from preprocess.load import load_volume

AIR, TISSUE = (-1250, -750), (-200, 200)


@pytest.mark.parametrize("sp_out", [(1.0, 1.0, 3.0), (0.5, 1.6, 1.0)])
def test_resample_matches_monai_spacing(ct_samples, sp_out):
    """Our separable resampler equals MONAI Orientationd+Spacingd on a real CT (LPS-stored CTA)."""
    import torch
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, Spacingd

    path = str(ct_samples / "aorta_report" / "ct_cropped.nii.gz")
    d = Compose([LoadImaged(keys="img", image_only=False), EnsureChannelFirstd(keys="img"),
                 Orientationd(keys="img", axcodes="RAS"),
                 Spacingd(keys="img", pixdim=sp_out, mode="bilinear")])({"img": path})
    ref = d["img"][0].numpy()
    v = load_volume(path)
    arr, aff, codes = to_canonical(v.array, v.affine, "RAS")
    assert codes == "LPS"
    ours = resample(arr, (1.5, 1.5, 1.5), sp_out, linear=True)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 1e-2
    assert torch.is_tensor(d["img"])


def test_nearest_resample_matches_monai_without_ties():
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Spacing

    lab = np.random.default_rng(0).integers(0, 5, size=(30, 20, 16)).astype(np.float32)
    t = MetaTensor(torch.from_numpy(lab)[None], affine=torch.tensor(np.diag([0.7, 0.9, 1.3, 1.0])))
    ref = Spacing(pixdim=(1.1, 1.7, 2.9), mode="nearest")(t)[0].numpy()
    ours = resample(lab.astype(np.uint8), (0.7, 0.9, 1.3), (1.1, 1.7, 2.9), linear=False)
    assert ours.dtype == np.uint8 and (ours == ref).mean() > 0.99


def test_shape_rule():
    assert resampled_shape((10, 10, 10), (0.7, 0.7, 0.7), (1.0, 3.0, 0.5)) == (7, 3, 14)


def test_affine_checks():
    with pytest.raises(CaseError, match="degenerate voxel spacing"):
        check_affine(np.diag([1.0, 0.0, 1.0, 1.0]), 20)
    a = np.eye(4)
    a[:3, 2] = [1.0, 0.0, 0.0]
    with pytest.raises(CaseError, match="parallel"):
        check_affine(a, 20)
    th = np.radians(30)
    r = np.eye(4)
    r[:2, :2] = [[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]
    with pytest.raises(CaseError, match="oblique"):
        check_affine(r, 20)
    sp, ang = check_affine(r, 45)
    assert abs(ang - 30) < 1e-6 and np.allclose(sp, 1)
    with pytest.raises(CaseError, match="finite"):
        check_affine(np.full((4, 4), np.nan), 20)


def test_crop_policy():
    vol = np.arange(40 * 30 * 20, dtype=np.int16).reshape(40, 30, 20)
    lab = np.zeros(vol.shape, np.uint8)
    lab[10:20, 5:15, 2:6] = 3
    img, msk, info = crop_anatomy(vol, lab, 3, (10, 5, 2, 20, 15, 6), (1, 1, 1), (16, 16, 8), 1.0)
    assert info["scale"] == 1.0 and msk.sum() == 400 and img.shape == (16, 16, 8)
    o = [int(v) for v in info["origin_vox"]]
    np.testing.assert_array_equal(img[2:14, 2:14, 2:6], vol[o[0] + 2:o[0] + 14, o[1] + 2:o[1] + 14, o[2] + 2:o[2] + 6])
    # too big: one isotropic scale, whole organ kept
    img, msk, info = crop_anatomy(vol, lab, 3, (10, 5, 2, 20, 15, 6), (1, 1, 1), (6, 6, 6), 0.0)
    assert info["scale"] == pytest.approx(10 / 6, rel=1e-3) and msk.sum() > 0 and img.shape == (6, 6, 6)
    _, msk_c, info_c = crop_anatomy(vol, lab, 3, (10, 5, 2, 20, 15, 6), (1, 1, 1), (6, 6, 6), 0.0, "clip")
    assert info_c["scale"] == 1.0 and msk_c.sum() == 6 * 6 * 4
    w = window(vol, (-2, 0, 0), (4, 2, 2), -1024)
    assert (w[:2] == -1024).all() and (w[2:] == vol[:2, :2, :2]).all()
    out, off = center_fit(vol, (44, 20, 20), -1024)
    assert off == [2, -5, 0] and (out[2:42] == vol[:, 5:25]).all() and (out[:2] == -1024).all()


def test_hu_diagnosis_real(ct_samples):
    a = load_volume(ct_samples / "example_ct_sm.nii.gz").array
    out, info = apply_hu_policy(a, "fail", AIR, TISSUE)
    assert info["status"] == "ok"
    raw = a.astype(np.int32) + 1024
    with pytest.raises(CaseError, match="stored raw"):
        apply_hu_policy(raw, "apply_metadata", AIR, TISSUE)
    fixed, info = apply_hu_policy(raw, "apply_metadata", AIR, TISSUE, metadata_rescale=(1.0, -1024.0))
    assert info["action"] == "applied_metadata_rescale" and np.array_equal(fixed, a)
    fixed, info = apply_hu_policy(raw, "correct", AIR, TISSUE)
    assert info["action"] == "corrected_offset" and np.array_equal(fixed, a)
    with pytest.raises(CaseError, match="applied twice"):
        apply_hu_policy(a.astype(np.int32) - 1024, "fail", AIR, TISSUE)
    with pytest.raises(CaseError, match="slope"):
        apply_hu_policy(a.astype(np.int32) * 2, "fail", AIR, TISSUE)
    # already HU + a metadata intercept: never applied a second time
    same, info = apply_hu_policy(a, "apply_metadata", AIR, TISSUE, metadata_rescale=(1.0, -1024.0))
    assert same is a and info["action"] == "metadata_rescale_ignored"
    nan = a.astype(np.float32)
    nan[0, 0, 0] = np.nan
    with pytest.raises(CaseError, match="NaN"):
        apply_hu_policy(nan, "apply_metadata", AIR, TISSUE)
