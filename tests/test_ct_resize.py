"""The loader's label-map resize picks source voxels by index (no float copy of the map): it must equal
``F.interpolate(mode="nearest-exact")`` of the float map exactly, for every size pair and dtype."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fvlm.data.ct import _fit, _resize


def _reference(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x[None].float(), size=tuple(size), mode="nearest-exact")[0].to(x.dtype)


def test_index_resize_equals_nearest_exact_on_every_axis_length():
    # lengths 1..160 to awkward targets, including pairs where float rounding decides (2 -> 49, 2 -> 61)
    for n_in in range(1, 161):
        x = torch.arange(n_in, dtype=torch.int16).reshape(1, n_in, 1, 1)
        for n_out in {1, 2, 3, 7, 32, 49, 61, 96, 112, 160, 224, 512, n_in + 1, max(1, n_in - 1), 2 * n_in, 3 * n_in}:
            got = _resize(x, (n_out, 1, 1), "nearest")
            assert torch.equal(got, _reference(x, (n_out, 1, 1))), (n_in, n_out)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.bool])
def test_index_resize_equals_nearest_exact_on_label_volumes(dtype):
    rng = np.random.default_rng(0)
    for _ in range(20):
        shape = tuple(int(v) for v in rng.integers(1, 60, 3))
        size = tuple(int(v) for v in rng.integers(1, 70, 3))
        x = torch.from_numpy(rng.integers(0, 16, (2, *shape))).to(dtype)
        got = _resize(x, size, "nearest")
        assert got.dtype == dtype and got.shape == (2, *size)
        assert torch.equal(got, _reference(x, size)), (shape, size)
        fit = _fit(x, size, "nearest", 0)           # the aspect-keeping path uses the same resize
        assert fit.dtype == dtype and fit.shape == (2, *size)
