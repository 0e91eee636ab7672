"""One sample path (fvlm.data.inputs): the training batch equals the evaluation batch bitwise, the
host stage ships only stored int16/uint8 voxels, and the device stage's resize is the documented one."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fvlm.cli import main
from fvlm.data.ct import CTStream, SampleOptions, make_batch_fn, prepare_batch, read_batch
from fvlm.data.sampling import axis_taps
from fvlm.data.shards import ShardDataset, resized_positions, window
from fvlm.errors import FvlmError

IMAGE_KEYS = ("volume", "label_map", "crops", "crop_masks")


@pytest.fixture(scope="module")
def real_shards(ct_samples, tmp_path_factory):
    """example_ct and example_ct_sm preprocessed with the small layout (volume 96x96x48 at 3 mm)."""
    tmp = tmp_path_factory.mktemp("shards")
    man = tmp / "m.csv"
    man.write_text("case_id,image,mask,split\n"
                   f"ct,{ct_samples / 'example_ct.nii.gz'},{ct_samples / 'example_seg_fast_force_split.nii.gz'},train\n"
                   f"sm,{ct_samples / 'example_ct_sm.nii.gz'},{ct_samples / 'example_seg.nii.gz'},train\n")
    out = tmp / "o"
    assert main(["preprocess", "--manifest", str(man), "--out", str(out), "--config", "preprocess/small", "-q",
                 "--set", "reports.labeler=false"]) == 0
    return ShardDataset(out)


def _opts(ds, mode, antialias=False):
    anats = [a for a in ds.anatomies][:6]
    return SampleOptions(anatomies=anats, volume_size=[48, 40, 24] if mode == "volume" else None,
                         crop_size=[24, 20, 16] if mode == "crop" else None,
                         anatomy_windows={anats[0]: (-1000.0, 0.0)}, antialias=antialias)


@pytest.mark.parametrize("mode", ["volume", "crop"])
@pytest.mark.parametrize("antialias", [False, True])
def test_training_batch_equals_evaluation_batch_bitwise(real_shards, mode, antialias):
    ds = real_shards
    opts = _opts(ds, mode, antialias)
    ids = ds.case_ids()
    stream = CTStream(ds, ids, opts, batch_size=2, seed=0, source_anatomies=ds.anatomies)
    host = stream.make(0)
    train = stream.prepare(host)
    order = list(host["case_id"])
    ev = make_batch_fn(opts).load(ds, order)
    keys = [k for k in IMAGE_KEYS if k in train]
    assert keys == (["volume", "label_map"] if mode == "volume" else ["crops", "crop_masks"])
    for k in keys:
        assert train[k].dtype == ev[k].dtype and torch.equal(train[k], ev[k]), k
    # what crossed from the worker: stored int16 HU and uint8 label voxels, nothing resampled or float
    for raw in host["raw"]:
        for v, m in raw["boxes"]:
            assert v.dtype == torch.int16 and m.dtype == torch.uint8
    # and the batch is a real model input: windowed, masks present where anatomies are
    x = train["volume"] if mode == "volume" else train["crops"]
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.std()) > 0.05
    if mode == "crop":
        assert int(train["crop_masks"].sum()) > 0


def test_crop_mode_input_is_the_training_crop_of_the_old_reader(real_shards):
    """The device stage samples where the shard reader's ``get(crop_size=...)`` samples (composed
    crop policy + resize positions) and windows after sampling: equal up to float rounding."""
    ds = real_shards
    opts = _opts(ds, "crop")
    b = make_batch_fn(opts).load(ds, ["ct"])
    rec = ds.get("ct", anatomies=opts.anatomies, volume=False, crop_size=opts.crop_size)
    for k, a in enumerate(opts.anatomies):
        if not rec.present[a]:
            assert int(b["crop_masks"][0, k].sum()) == 0
            continue
        lo, hi = opts.anatomy_windows.get(a, opts.window)
        np.testing.assert_allclose(b["crops"][0, k, 0].numpy(), window(rec.crops[a], lo, hi), atol=2e-5)
        np.testing.assert_array_equal(b["crop_masks"][0, k].numpy(), rec.crop_masks[a])


def test_predict_path_samples_one_scan_as_training_samples_its_shard(real_shards):
    """A one-case reader's record (``fvlm predict``, ``fvlm.load().embed``) carries its stored grid:
    ``make_batch(records)`` then equals the shard's training input."""
    from fvlm.data.shards import InMemoryCase

    ds = real_shards
    for mode in ("volume", "crop"):
        opts = _opts(ds, mode)
        full = ds.get("sm", volume=False, crops=False)
        vol, lab = (np.asarray(x[()]) for x in ds.stored("sm"))
        full.volume, full.label_map = vol, lab
        one = InMemoryCase(full, ds.layout)
        a = make_batch_fn(opts)([one.get()])
        b = make_batch_fn(opts).load(ds, ["sm"])
        for k in (k for k in IMAGE_KEYS if k in b):
            assert torch.equal(a[k], b[k]), (mode, k)


def test_area_taps_average_integer_blocks_like_adaptive_pooling():
    """antialias: a 3x shrink of an axis is the mean of each 3-voxel block (F.avg_pool1d);
    weights always sum to 1 and stay inside the source."""
    x = torch.arange(24, dtype=torch.float32) ** 2
    pos = resized_positions([np.arange(24.0)], [8])[0]
    idx, w, out = axis_taps(pos, 24, linear=True, step=3.0, antialias=True)
    got = (x[torch.from_numpy(idx)] * torch.from_numpy(w)).sum(1)
    ref = F.avg_pool1d(x[None, None], 3)[0, 0]
    torch.testing.assert_close(got, ref)
    assert not out.any() and np.allclose(w.sum(1), 1.0) and idx.min() >= 0 and idx.max() <= 23
    # off: point sampling reads one voxel in three (the block centres 1, 4, 7, ...)
    idx2, w2, _ = axis_taps(pos, 24, linear=True, step=3.0, antialias=False)
    assert idx2[:, 0].tolist() == list(range(1, 24, 3)) and np.all(w2[:, 0] == 1)
    # a 1.2x shrink stays linear even with antialias (below ANTIALIAS_MIN_SHRINK)
    assert axis_taps(np.linspace(0, 23, 20), 24, True, 1.2, True)[0].shape[1] == 2


def test_antialias_keeps_a_small_bright_dot_at_every_position():
    """A 1-voxel dot in a 96^3 crop shrunk to 32^3: point sampling keeps it (1.0) or drops it (0)
    depending on where it falls; area averaging keeps a constant share (1/27) wherever it is."""
    from fvlm.data.inputs import Plan, _resample

    peaks = {False: set(), True: set()}
    for off in range(3):
        vol = torch.zeros(96, 96, 96, dtype=torch.int16)
        vol[45 + off, 45 + off, 45 + off] = 1000
        pos = resized_positions([np.arange(96.0)] * 3, [32] * 3)
        for aa in (False, True):
            taps = [axis_taps(p, 96, True, 3.0, aa) for p in pos]
            plan = Plan(0, taps, [0, 1, 2], True, -1024)
            y = _resample(vol, plan, "cpu")
            peaks[aa].add(round(float(y.max()), 3))
    assert len(peaks[False]) > 1 and 0.0 in peaks[False]          # flickers, and vanishes at one offset
    assert peaks[True] == {round(1000 / 27, 3)}


def test_device_stage_runs_on_the_batch_device_and_host_batch_is_untouched(real_shards):
    ds = real_shards
    opts = _opts(ds, "volume")
    host = read_batch(ds, ["ct"], opts)
    before = [v.clone() for v, _ in host["raw"][0]["boxes"]]
    a = prepare_batch(host, opts, "cpu")
    b = prepare_batch(host, opts, "cpu")
    assert torch.equal(a["volume"], b["volume"]) and "raw" not in a
    assert all(torch.equal(x, v) for x, (v, _) in zip(before, host["raw"][0]["boxes"]))


def test_cache_stores_the_model_input_and_training_reads_it(real_shards, tmp_path, capsys):
    """`fvlm cache` samples every case to the model grid once; a cached case gives the uncached
    input up to whole-HU rounding (label maps and masks exactly), is refused for another input,
    and `fvlm pretrain` reads it (data.cache: auto) without any other change of the command."""
    from fvlm.data.cache import CachedShards, build_cache, cache_dir

    ds = real_shards
    common = ["--config", "train/tiny.yaml", "--data", str(ds.root), "--set", "data.batch_size=2",
              "--set", "val.enabled=false", "-q"]
    for mode_sets in (["--set", "model.mode=crop", "--set", "data.crop_size=[32,32,16]",
                       "--set", "data.anatomies=[lung,liver,spleen]"], []):
        assert main(["cache"] + common + mode_sets) == 0
    for mode in ("volume", "crop"):
        opts = _opts(ds, mode)
        d = build_cache(ds, opts, tmp_path / mode)
        cached = CachedShards(ds, d, opts)
        a = make_batch_fn(opts).load(cached, ds.case_ids())
        b = make_batch_fn(opts).load(ds, ds.case_ids())
        # the text side comes from the cache's own metadata, unchanged
        assert a["texts"] == b["texts"] and torch.equal(a["labels"], b["labels"]) and torch.equal(a["present"], b["present"])
        for k in (k for k in IMAGE_KEYS if k in b):
            if b[k].dtype == torch.uint8:
                assert torch.equal(a[k], b[k]), (mode, k)
            else:   # 0.5 HU over the narrowest window here (1,000 HU)
                assert float((a[k] - b[k]).abs().max()) <= 0.5 / 1000 + 1e-6, (mode, k)
        # a second build finds it complete; another input size is another cache, refused by this one
        assert build_cache(ds, opts, tmp_path / mode) == d
        other = _opts(ds, mode)
        if mode == "volume":
            other.volume_size = [32, 32, 16]
        else:
            other.crop_size = [16, 16, 8]
        with pytest.raises(Exception, match="another model input"):
            CachedShards(ds, d, other)
    # a cache written before the volume-mode fix (version 1) is refused, never read
    info = json.loads((d / "cache.json").read_text())
    (d / "cache.json").write_text(json.dumps(dict(info, version=1)))
    with pytest.raises(FvlmError, match="rebuild it with `fvlm cache`"):
        CachedShards(ds, d, opts)
    # the CLI wrote <shards>/cache/<key> for the tiny config, and pretrain picks it up
    assert len(list((ds.root / "cache").iterdir())) == 2
    assert main(["pretrain"] + common + ["--out", str(tmp_path / "run"), "--steps", "2"]) == 0
    assert "training reads the model-input cache" in (tmp_path / "run" / "pretrain.log").read_text()


def test_cache_build_resumes_after_a_crash(real_shards, tmp_path, monkeypatch):
    from fvlm.data import cache

    ds = real_shards
    opts = _opts(ds, "volume")
    monkeypatch.setattr(cache, "_FLUSH_EVERY", 1)
    calls = {"n": 0}
    orig = cache.sample_case

    def boom(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return orig(*a, **k)

    monkeypatch.setattr(cache, "sample_case", boom)
    with pytest.raises(KeyboardInterrupt):
        cache.build_cache(ds, opts, tmp_path / "c")
    info = cache._read_info(tmp_path / "c")
    assert info["progress"] == 1 and not info["complete"]
    monkeypatch.setattr(cache, "sample_case", orig)
    d = cache.build_cache(ds, opts, tmp_path / "c")
    ref = cache.build_cache(ds, opts, tmp_path / "ref")
    for name in ("volume", "labels"):
        assert np.array_equal(np.load(d / f"{name}.npy"), np.load(ref / f"{name}.npy"))


def test_two_loader_workers_give_the_in_process_batches(real_shards, tmp_path):
    """Workers read boxes and cache rows straight into shared memory; the batches they hand over
    equal the in-process ones bitwise (2 real worker processes)."""
    from fvlm.data.cache import CachedShards, build_cache
    from fvlm.engine.loader import make_loader

    ds = real_shards
    for mode in ("volume", "crop"):
        opts = _opts(ds, mode)
        cached = CachedShards(ds, build_cache(ds, opts, tmp_path / mode), opts)
        for src in (ds, cached):
            stream = CTStream(src, ds.case_ids(), opts, batch_size=1, seed=0, source_anatomies=ds.anatomies)
            it = iter(make_loader(stream, num_workers=2, prefetch_factor=1))
            for b in range(3):
                got = stream.prepare(next(it))
                want = stream.prepare(stream.make(b))
                assert got["case_id"] == want["case_id"]
                for k in (k for k in IMAGE_KEYS if k in want):
                    assert torch.equal(got[k], want[k]), (mode, type(src).__name__, k)
            del it


def test_dense_training_input_is_the_evaluation_input_bitwise(real_shards, ct_samples):
    """The dense programs read through the one sample path: a shard case's dense volume (what `fvlm dense
    train` cuts its crops from and `fvlm dense eval` slides over) is the pretraining path's volume-mode input
    at ``volume_size = whole_shape``, bitwise; every training crop is the evaluation volume's voxels at its
    origin; with ``data.spacing_mm`` training and evaluation still read one and the same resampled volume;
    `fvlm dense ground` reads a NIfTI as the samples source does."""
    import dataclasses
    from types import SimpleNamespace

    from fvlm.config import build
    from fvlm.dense.config import DataConfig
    from fvlm.dense.data import load_cases, sample_crop
    from fvlm.dense.evaluate import _inputs
    from fvlm.dense.ground import load_image

    ds = real_shards
    classes = [ds.anatomies[k] for k in (4, 7, 1)]          # not the shards' order
    cfg = build(DataConfig, {"source": "shards", "root": str(ds.root), "classes": classes, "window": [-150, 250],
                             "train_split": "train", "eval_split": "train"})
    opts = SampleOptions(anatomies=classes, window=(-150.0, 250.0), volume_size=list(ds.whole_shape))
    size = (32, 32, 16)
    for spacing in ([], [4.0, 4.0, 5.0]):
        c = dataclasses.replace(cfg, spacing_mm=spacing)
        train, ev = load_cases(c, classes, "train"), load_cases(c, classes, "eval")
        assert [t.case_id for t in train] == [e.case_id for e in ev] == ds.case_ids("train")
        for t, e in zip(train, ev):
            assert t.image.dtype == np.float32 and t.label.dtype == np.uint8
            assert np.array_equal(t.image, e.image) and np.array_equal(t.label, e.label)
            assert torch.equal(_inputs(SimpleNamespace(spatial_dims=3), e)[0, 0], torch.from_numpy(t.image))
            if not spacing:
                assert t.image.shape == tuple(ds.whole_shape) and t.spacing_mm == (3.0, 3.0, 3.0)
                b = make_batch_fn(opts).load(ds, [t.case_id])
                assert torch.equal(b["volume"][0, 0], torch.from_numpy(t.image))
                assert torch.equal(b["label_map"][0], torch.from_numpy(t.label))
            else:   # one resampling of the stored grid: 96 voxels at 3 mm -> round(95 * 3 / 4 + 1) = 72 at 4 mm
                assert t.image.shape == (72, 72, 29) and t.spacing_mm == (4.0, 4.0, 5.0)
                assert set(np.unique(t.label).tolist()) <= {0, 1, 2, 3} and t.label.any()
            assert 0.0 <= float(t.image.min()) and float(t.image.max()) <= 1.0
            rng = np.random.default_rng(0)
            for _ in range(4):
                img, lab, _, origin = sample_crop(t, size, rng)
                sl = tuple(slice(o, o + s) for o, s in zip(origin, size))
                assert np.array_equal(img, e.image[sl]) and np.array_equal(lab, e.label[sl])
    # fvlm dense ground: a NIfTI CT through the same path as the samples source (its held-out slab)
    samples = build(DataConfig, {"classes": classes, "holdout_z": [88, 100]})
    (held,) = load_cases(samples, classes, "eval")
    img, _, info = load_image(ct_samples / "example_ct.nii.gz", None, {"window": list(samples.window)})
    assert info["shape"] == list(img.shape) and np.array_equal(img[:, :, 88:100], held.image)


def test_volume_mode_keeps_every_voxel_of_a_scan_larger_than_the_whole_grid(real_shards):
    """A stored volume larger than ``whole_shape`` (example_ct: 122 x 101 x 112 voxels at 3 mm into
    96 x 96 x 48) is centre-cropped, not cut short: at ``volume_size = whole_shape`` the sample path gives
    the shard reader's whole volume, windowed, everywhere (the plan once took the whole grid's extent for
    the stored one and put air in the far 13 x, 3 y and 32 z whole-grid voxels)."""
    ds = real_shards
    opts = SampleOptions(anatomies=list(ds.anatomies), volume_size=list(ds.whole_shape))
    for cid in ds.case_ids():
        b = make_batch_fn(opts).load(ds, [cid])
        rec = ds.get(cid, crops=False)
        np.testing.assert_allclose(b["volume"][0, 0].numpy(), window(rec.volume, *opts.window), atol=2e-6)
        np.testing.assert_array_equal(b["label_map"][0].numpy(), rec.label_map)
