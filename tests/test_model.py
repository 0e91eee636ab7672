"""The fVLM model, its data transform and the consolidated checkpoint (no DeepSpeed)."""
import itertools

import pytest
import torch

from fvlm.data.ct import CTStream, SampleOptions, collate, make_batch_fn, record_to_sample
from fvlm.data.synthetic_ct import SyntheticCTSource
from fvlm.errors import FormatError, FvlmError
from fvlm.losses import FineGrainedContrastiveLoss, LossConfig
from fvlm.models import create_model
from fvlm.models.checkpoint import (IMAGE_ENCODER_PREFIX, image_encoder_state_dict, load_consolidated,
                                    save_consolidated)

ANATS = ["lung", "heart", "liver", "kidney"]


@pytest.fixture(scope="module")
def source():
    return SyntheticCTSource(24, anatomies=ANATS, shape=(32, 32, 16), crop_shape=(16, 16, 8))


def _cfg(mode="volume", **kw):
    img = [16, 16, 8] if mode == "crop" else [32, 32, 16]
    cfg = {"mode": mode, "anatomies": ANATS, "embed_dim": 16, "center_image": True,
           "image": {"encoder": "vit3d_nano", "img_size": img, "patch_size": [8, 8, 4], "levels": [0, 1],
                     "encoder_args": {"depth": 2, "embed_dim": 32, "num_heads": 2}},
           "text": {"model_dir": "tiny-random", "center": True}}
    cfg.update(kw)
    return cfg


def _opts(source, mode="volume"):
    return SampleOptions(anatomies=ANATS, volume_size=[32, 32, 16], crop_size=[16, 16, 8] if mode == "crop" else None,
                         diagnoses=[d["id"] for d in source.diagnoses])


@pytest.mark.parametrize("mode", ["volume", "crop", "global"])
def test_forward_shapes_and_loss(source, mode):
    torch.manual_seed(0)
    model = create_model("clip" if mode == "global" else "fvlm", _cfg(mode))
    b = make_batch_fn(_opts(source, mode))([source.get(c) for c in source.case_ids()[:6]])
    out = model(b)
    names = ["global"] if mode == "global" else ANATS + ["global"]
    assert list(out["image"]) == names
    for n in names:
        assert out["image"][n].shape == (6, 16) and out["valid"][n].shape == (6,)
        assert torch.allclose(out["image"][n].norm(dim=-1), torch.ones(6), atol=1e-4)
    loss, logs = FineGrainedContrastiveLoss(LossConfig(), [] if mode == "global" else ANATS)(out, b)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.image_encoder.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in model.text_encoder.parameters())   # frozen


def test_absent_anatomy_is_invalid(source):
    model = create_model("fvlm", _cfg())
    rec = source.get(source.case_ids()[0])
    rec.present["heart"] = False
    rec.label_map[rec.label_map == 2] = 0
    out = model(make_batch_fn(_opts(source))([rec]))
    assert not out["valid"]["heart"][0] and out["valid"]["lung"][0]


def test_text_cache_encodes_each_sentence_once(source):
    model = create_model("fvlm", _cfg())
    calls = []
    orig = model._text_forward
    model._text_forward = lambda texts, **kw: calls.append(len(texts)) or orig(texts, **kw)
    b = make_batch_fn(_opts(source))([source.get(c) for c in source.case_ids()[:8]])
    model(b)
    n_unique = len({t for row in b["texts"] for t in row if t} | set(b["global_text"]))
    G = model.cfg.text.encode_group
    model(b)
    assert calls == [G] * -(-n_unique // G)     # fixed-size groups, none on the second pass


@pytest.fixture(scope="module")
def minilm_model():
    """The shipped MiniLM: its features move by ~1e-6 with the padding length (the tiny BERT's do not)."""
    torch.manual_seed(0)
    return create_model("fvlm", _cfg(text={"model_dir": None, "center": False, "encode_group": 8}))


def test_frozen_text_features_do_not_depend_on_the_batch(source, minilm_model):
    """Cache on, cache off, and whatever came before: the same bits (resume after kill -9 is exact)."""
    model = minilm_model
    recs = [source.get(c) for c in source.case_ids()[:10]]
    mk = make_batch_fn(_opts(source))
    b1, b2 = mk(recs[:6]), mk(recs[3:10])
    model._text_cache.clear()
    model.text_features(b1)
    warm = model.text_features(b2)           # b2's texts: part cached from b1, part new
    model._text_cache.clear()
    cold = model.text_features(b2)           # all new, encoded together
    model.cfg.text.cache = False
    try:
        off = model.text_features(b2)
    finally:
        model.cfg.text.cache = True
    for a, b in [(warm, cold), (warm, off)]:
        assert torch.equal(a[2], b[2]) and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # and each text alone gives the same bits as inside any group
    strings = [t for row in b2["texts"] for t in row if t][:5]
    alone = torch.cat([model._frozen_text([t]) for t in strings])
    assert torch.equal(alone, model._frozen_text(strings[::-1]).flip(0))
    # the batch as given (dynamic padding) is not canonical: that is what made resume inexact
    assert len({len(model.text_encoder.tokenize([t])["input_ids"][0]) for t in strings}) > 1


def test_trained_text_encoder_is_never_cached(source):
    model = create_model("fvlm", _cfg(text={"model_dir": "tiny-random", "freeze": False}))
    b = make_batch_fn(_opts(source))([source.get(c) for c in source.case_ids()[:4]])
    with torch.no_grad():
        model.eval()(b)
    assert not model._text_cache        # cached under no_grad, it would go stale after the next step


def test_record_to_sample_text_rules(source):
    rec = source.get(source.case_ids()[0])
    rec.anatomy_text["liver"] = {"status": "not_mentioned", "sentences": []}
    rec.anatomy_text["lung"] = {"status": "abnormal", "sentences": ["a.", "b.", "c."]}
    o = _opts(source)
    s = record_to_sample(rec, o)
    assert s["texts"][2] == "The liver is normal." and s["status"][2] == 1
    assert s["texts"][0] == "a. b. c." and s["status"][0] == 2
    o.unmentioned, o.max_sentences = "skip", 2
    s = record_to_sample(rec, o)
    assert s["texts"][2] == "" and not s["has_text"][2] and s["texts"][0] == "a. b."
    assert s["volume"].shape == (1, 32, 32, 16) and 0 <= float(s["volume"].min()) and float(s["volume"].max()) <= 1
    assert set(s["label_map"].unique().tolist()) <= {0, 1, 2, 3, 4}


def test_stream_deterministic_with_workers_and_resume(source):
    o = _opts(source)
    o.volume_size = None       # ids only: skip building volumes
    ids = source.case_ids("train")

    def ids_of(nw, start, n):
        ds = CTStream(source, ids, o, 4, seed=3, start=start)
        dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=nw)
        return [b["case_id"] for b in itertools.islice(iter(dl), n)]

    ref = ids_of(0, 0, 6)
    assert ids_of(2, 0, 6) == ref
    assert ids_of(2, 3, 3) == ref[3:]
    r0 = CTStream(source, ids, o, 2, rank=0, world=2, seed=3)
    r1 = CTStream(source, ids, o, 2, rank=1, world=2, seed=3)
    assert not set(r0.batch_ids(0)) & set(r1.batch_ids(0))


def test_consolidated_roundtrip(source, tmp_path):
    torch.manual_seed(0)
    model = create_model("fvlm", _cfg()).eval()
    opts = _opts(source)
    p = save_consolidated(tmp_path / "m.pt", model, {"data": opts.to_dict(), "step": 7})
    raw = torch.load(p, weights_only=True)
    assert raw["format"] == "fvlm-model" and raw["version"] == 1
    assert any(k.startswith(IMAGE_ENCODER_PREFIX) for k in raw["state_dict"])
    enc = image_encoder_state_dict(p)
    assert "patch_embed.proj.weight" in enc
    m2, meta = load_consolidated(p)
    assert meta["step"] == 7 and meta["anatomies"] == ANATS
    b = make_batch_fn(meta["data"])([source.get(c) for c in source.case_ids()[:3]])
    with torch.no_grad():
        e1, e2 = model.encode_image(b), m2.encode_image(b)
        for n in e1:
            assert torch.allclose(e1[n], e2[n], atol=1e-5)
        t1, t2 = model.encode_text(["The liver is normal."], "liver"), m2.encode_text(["The liver is normal."], "liver")
    assert torch.allclose(t1, t2, atol=1e-5) and t1.shape == (1, 16)


def test_bad_inputs(source, tmp_path):
    with pytest.raises(FvlmError, match="unknown model"):
        create_model("fvlmm")
    model = create_model("fvlm", _cfg())
    with pytest.raises(FvlmError, match="unknown anatomy 'pancreas'"):
        model.encode_text(["x"], "pancreas")
    with pytest.raises(FvlmError, match="anatomies is empty"):
        create_model("fvlm", _cfg(anatomies=[]))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(FormatError, match="not a loadable"):
        load_consolidated(tmp_path / "bad.pt")
    torch.save({"format": "fvlm-model", "version": 99}, tmp_path / "v99.pt")
    with pytest.raises(FormatError, match="version 99"):
        load_consolidated(tmp_path / "v99.pt")
    with pytest.raises(FvlmError, match="not found"):
        load_consolidated(tmp_path / "missing.pt")


def test_shards_feed_the_training_stream(source, tmp_path):
    """Shards written with the preprocess format -> prepare() -> CTStream -> model -> loss."""
    from fvlm.config import load_config
    from fvlm.data import shards
    from fvlm.ct.pretrain import PretrainConfig, prepare

    root = tmp_path / "shards"
    # the shard stores anatomies in another order than the model uses: label maps must be remapped
    order = ["kidney", "lung", "heart", "liver"]
    src = SyntheticCTSource(16, anatomies=order, shape=(32, 32, 16), crop_shape=(16, 16, 8))
    layout = shards.ShardLayout(anatomies=order, crop_shapes=dict(src.crop_shapes), whole_shape=(32, 32, 16))
    recs = [src.get(c) for c in src.case_ids()]
    shards.write_shard(root / "shards" / "000-00000.h5", layout, recs, n=len(recs))
    shards.write_index(root / "index.jsonl", [
        {"case_id": r.case_id, "patient_id": r.patient_id, "split": r.split, "shard": "shards/000-00000.h5",
         "row": i, "anatomies": [a for a in order if r.present.get(a)]} for i, r in enumerate(recs)])
    shards.write_dataset_info(root, layout)
    cfg = load_config(PretrainConfig, files=["train/tiny.yaml"], base="train/default.yaml",
                      sets=[f"data.shards={root}", "data.anatomies=[lung, liver]",
                            "data.diagnoses=[lung_lesion, liver_lesion]"])
    ds, opts, model, loss_fn, _ = prepare(cfg)
    assert model.anatomies == ["lung", "liver"]
    stream = CTStream(ds, ds.case_ids("train"), opts, 4, source_anatomies=ds.anatomies)
    b = stream.prepare(stream.make(0))   # host batch -> model batch (the trainer does this on the device)
    rec = ds.get(b["case_id"][0])
    want = torch.from_numpy((rec.label_map == order.index("liver") + 1).astype("uint8"))
    assert torch.equal((b["label_map"][0] == 2).to(torch.uint8), want)
    loss, logs = loss_fn(model(b), b)
    assert torch.isfinite(loss) and "loss/liver" in logs and "loss/kidney" not in logs


def test_augmentation_is_seeded_and_keeps_masks_aligned(source):
    from fvlm.data.ct import AugmentConfig
    import numpy as np

    rec = source.get(source.case_ids()[0])
    o = SampleOptions(anatomies=ANATS, volume_size=[32, 32, 16], crop_size=[16, 16, 8])
    aug = AugmentConfig(enabled=True, prob=1.0)
    a = record_to_sample(rec, o, rng=np.random.default_rng(1), augment=aug)
    b = record_to_sample(rec, o, rng=np.random.default_rng(1), augment=aug)
    plain = record_to_sample(rec, o)
    assert torch.equal(a["volume"], b["volume"]) and not torch.equal(a["volume"], plain["volume"])
    assert a["label_map"].dtype == torch.uint8 and set(a["label_map"].unique().tolist()) <= {0, 1, 2, 3, 4}
    assert a["crops"].shape == plain["crops"].shape


def test_no_weight_decay_covers_model_tokens_and_encoder_sets():
    model = create_model("fvlm", _cfg(logit_bias_init=-10.0, proj_hidden=8))
    nwd = model.no_weight_decay()
    params = dict(model.named_parameters())
    assert nwd <= params.keys()
    enc = {"image_encoder." + n for n in model.image_encoder.no_weight_decay()}
    txt = {"text_encoder." + n for n in model.text_encoder.no_weight_decay()}
    assert enc | txt <= nwd and "image_encoder.cls_token" in nwd
    assert {"pool.q", "pool.norm.weight", "pool.k.bias", "logit_scale", "logit_bias",
            "image_proj.b1", "image_proj.b2", "text_proj.b1"} <= nwd
    assert {"pool.k.weight", "image_proj.w1", "image_proj.w2", "text_proj.w1",
            "image_encoder.blocks.0.attn.qkv.weight"}.isdisjoint(nwd)
