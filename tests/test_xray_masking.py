"""Masking strategies and reconstruction losses for X-ray masked image modelling."""
import pytest
import torch
from scipy import ndimage as ndi

from fvlm.losses.mae import GMMLLoss, MAELoss
from fvlm.xray import masking


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_random_masking_ratio_and_partition():
    s = masking.random_masking(3, 196, 0.75, gen())
    assert s.keep.shape == (3, 49) and s.masked.shape == (3, 147)
    assert (s.mask.sum(1) == 147).all()
    for i in range(3):
        both = torch.cat([s.keep[i], s.masked[i]]).sort().values
        assert torch.equal(both, torch.arange(196))
        assert not s.mask[i, s.keep[i]].any() and s.mask[i, s.masked[i]].all()
    # reproducible with the same seed, different with another
    assert torch.equal(s.keep, masking.random_masking(3, 196, 0.75, gen()).keep)
    assert not torch.equal(s.keep, masking.random_masking(3, 196, 0.75, gen(1)).keep)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_bad_ratio_is_rejected(bad):
    with pytest.raises(ValueError, match="mask ratio"):
        masking.random_masking(1, 16, bad)
    with pytest.raises(ValueError, match="mask ratios"):
        masking.context_aware_masking(torch.ones(1, 16, dtype=torch.bool), bad, 0.5)


def test_context_aware_ratios_exact_for_equal_chests():
    n = 64 * 64  # 1024 px at patch 16
    inside = torch.zeros(4, n, dtype=torch.bool)
    for i in range(4):  # same size, different places
        inside[i, torch.randperm(n, generator=gen(i))[:1800]] = True
    s = masking.context_aware_masking(inside, 0.95, 0.85, gen())
    for i in range(4):
        r_in = s.mask[i][inside[i]].float().mean().item()
        r_out = s.mask[i][~inside[i]].float().mean().item()
        assert r_in == pytest.approx(0.95, abs=2e-3)
        assert r_out == pytest.approx(0.85, abs=2e-3)
    assert s.keep.shape[1] == round(1800 * 0.05 + (n - 1800) * 0.15)


def test_context_aware_ratios_on_real_contours(cxr_samples):
    """Realised ratios inside/outside the contours of the shipped radiographs match the config."""
    from fvlm.xray.data import list_images, load_sample

    entries = list_images(cxr_samples / "labels.csv")[:8]
    contours = torch.stack([torch.from_numpy(load_sample(e, 256)["contour"]) for e in entries])
    inside = masking.patch_regions(contours, (16, 16))
    assert inside.float().mean() > 0.2
    s = masking.context_aware_masking(inside, 0.95, 0.85, gen())
    r_in = s.mask[inside].float().mean().item()
    r_out = s.mask[~inside].float().mean().item()
    assert r_in == pytest.approx(0.95, abs=0.015)
    assert r_out == pytest.approx(0.85, abs=0.03)
    # per image the odds are what the config asks, whatever the chest size
    for i in range(len(entries)):
        assert s.mask[i][inside[i]].float().mean() > s.mask[i][~inside[i]].float().mean()


def test_context_aware_edge_cases():
    # no chest at all: everything is "outside"
    s = masking.context_aware_masking(torch.zeros(2, 100, dtype=torch.bool), 0.95, 0.8, gen())
    assert s.keep.shape[1] == 20
    # all chest
    s = masking.context_aware_masking(torch.ones(2, 100, dtype=torch.bool), 0.9, 0.5, gen())
    assert s.keep.shape[1] == 10
    with pytest.raises(ValueError, match="bool"):
        masking.context_aware_masking(torch.ones(2, 100), 0.9, 0.5)


def test_box_region_baseline():
    r = masking.box_region((10, 10), frac=(0.6, 0.8), center=(0.5, 0.5)).reshape(10, 10)
    assert r.sum() == 6 * 8
    assert r[2:8, 1:9].all()
    s = masking.context_aware_masking(r.reshape(1, -1).expand(2, -1), 0.9, 0.5, gen())
    assert s.mask[:, r.reshape(-1)].float().mean() > s.mask[:, ~r.reshape(-1)].float().mean()


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.7])
def test_block_masking_coverage_and_contiguity(fraction):
    grid = (32, 32)
    m = masking.block_masking(4, grid, fraction, gen())
    target = round(fraction * 1024)
    assert (m.sum(1) == target).all()
    for i in range(4):
        lab, n = ndi.label(m[i].reshape(grid).numpy())
        # blocks, not scattered patches: a handful of connected regions covering it
        sizes = ndi.sum(m[i].reshape(grid).numpy(), lab, range(1, n + 1))
        assert n <= 12 and sizes.max() >= 0.2 * target
    assert not torch.equal(m[0], m[1])


def test_corrupt_changes_only_corrupted_patches():
    x = torch.rand(3, 1, 64, 64, generator=gen())
    m = masking.block_masking(3, (4, 4), 0.5, gen())
    pix = masking.patch_to_pixel_mask(m, (4, 4), (16, 16))
    for mode in ("noise", "zeros", "swap", "mixed"):
        y = masking.corrupt(x, m, (16, 16), mode, gen())
        assert torch.equal(y[~pix], x[~pix])
        assert (y[pix] != x[pix]).float().mean() > 0.9
    y = masking.corrupt(x, m, (16, 16), "swap", gen())
    assert torch.equal(y[1][pix[1]], x[0][pix[1]])
    z = masking.corrupt(x, m, (16, 16), "zeros")
    assert (z[pix] == 0).all()
    with pytest.raises(ValueError, match="corruption mode"):
        masking.corrupt(x, m, (16, 16), "blur")


def test_mae_loss_ignores_visible_patches():
    x = torch.rand(2, 1, 64, 64, generator=gen())
    s = masking.random_masking(2, 16, 0.75, gen())
    pred = torch.randn(2, 16, 256, generator=gen(), requires_grad=True)
    loss = MAELoss((16, 16))(pred, x, s.mask)
    loss.backward()
    assert pred.grad[~s.mask].abs().sum() == 0
    assert (pred.grad[s.mask].abs().sum(-1) > 0).all()
    # changing visible predictions does not change the loss
    p2 = pred.detach().clone()
    p2[~s.mask] += 5.0
    assert MAELoss((16, 16))(p2, x, s.mask).item() == pytest.approx(loss.item())
    # the normalised-pixel target: perfect prediction gives zero
    from fvlm.losses.mae import patch_targets

    assert MAELoss((16, 16))(patch_targets(x, (16, 16)), x, s.mask).item() < 1e-8
    with pytest.raises(ValueError, match="does not match"):
        MAELoss((16, 16))(torch.zeros(2, 16, 10), x, s.mask)


def test_gmml_loss_only_on_corrupted_pixels():
    x = torch.rand(2, 1, 64, 64, generator=gen())
    m = masking.block_masking(2, (4, 4), 0.5, gen())
    pred = torch.randn(2, 16, 256, generator=gen(), requires_grad=True)
    loss = GMMLLoss((16, 16))(pred, x, m)
    loss.backward()
    assert pred.grad[~m].abs().sum() == 0
    assert (pred.grad[m] != 0).float().mean() > 0.99
    # padding pixels are excluded too
    valid = torch.ones(2, 64, 64, dtype=torch.bool)
    valid[:, :, :8] = False
    pred.grad = None
    GMMLLoss((16, 16))(pred, x, m, valid).backward()
    from fvlm.encoders import patchify

    vpix = patchify(valid[:, None].float(), (16, 16)) > 0.5
    assert pred.grad[~vpix].abs().sum() == 0
