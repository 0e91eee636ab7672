"""Issue 33's levers for focal findings: the demo's evaluation split, the auxiliary classification
loss on silver labels (a head owned by the model, BCE in a loss module) and the anatomy pooling choice."""
import argparse

import numpy as np
import pytest
import torch

from fvlm.data.ct import SampleOptions, make_batch_fn
from fvlm.data.synthetic_ct import SyntheticCTSource
from fvlm.errors import ConfigError, FvlmError
from fvlm.losses import LossConfig, build_loss
from fvlm.losses.classification import WithAuxLoss, group_mask, masked_group_bce
from fvlm.models import create_model
from fvlm.models.fvlm import _QueryPool

ANATS = ["lung", "heart", "liver", "kidney"]


@pytest.fixture(scope="module")
def source():
    return SyntheticCTSource(12, anatomies=ANATS, shape=(32, 32, 16), crop_shape=(16, 16, 8))


def _cfg(**kw):
    cfg = {"mode": "crop", "anatomies": ANATS, "embed_dim": 16, "center_image": True, "use_global": False,
           "image": {"encoder": "vit3d_nano", "img_size": [16, 16, 8], "patch_size": [8, 8, 4], "levels": [0, 1],
                     "encoder_args": {"depth": 2, "embed_dim": 32, "num_heads": 2}},
           "text": {"model_dir": "tiny-random", "center": True}}
    for k, v in kw.items():
        if k in ("pool", "pool_topk"):
            cfg["image"][k] = v
        else:
            cfg[k] = v
    return cfg


def _batch(source, n=6):
    diags = [d["id"] for d in source.diagnoses]
    opts = SampleOptions(anatomies=ANATS, volume_size=[32, 32, 16], crop_size=[16, 16, 8], diagnoses=diags)
    return make_batch_fn(opts)([source.get(c) for c in source.case_ids()[:n]])


def _groups(source):
    diags = [d["id"] for d in source.diagnoses]
    g = {a: [] for a in ANATS}
    for i, d in enumerate(source.diagnoses):
        if d["anatomy"] in g:
            g[d["anatomy"]].append(i)
    g["global"] = list(range(len(diags)))
    return g


# ------------------------------------------------------------------ the BCE math


def test_masked_group_bce_counts_only_known_labels_of_present_anatomies():
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 4)
    labels = torch.tensor([[1., 0., -1., 1.], [0., 1., 1., -1.], [-1., -1., 0., 0.]])
    valid = torch.tensor([[True, True], [True, False], [False, True]])
    groups = group_mask(["a", "b"], {"a": [0, 1], "b": [2, 3], "global": [0, 1, 2, 3]}, 4)
    loss, n = masked_group_bce(logits, labels, valid, groups)
    cells = [(0, 0, 0), (0, 0, 1), (0, 1, 3), (1, 0, 0), (1, 0, 1), (2, 1, 2), (2, 1, 3)]
    want = torch.stack([torch.nn.functional.binary_cross_entropy_with_logits(logits[b, a, d], labels[b, d])
                        for b, a, d in cells]).mean()
    assert int(n) == len(cells)
    assert torch.allclose(loss, want)
    # a cell outside the counted ones does not move the loss
    logits2 = logits.clone()
    logits2[1, 1] += 100.0          # anatomy b absent in case 1
    logits2[0, 0, 2] -= 100.0       # column 2 is not lung-group a's
    assert torch.allclose(masked_group_bce(logits2, labels, valid, groups)[0], want)


def test_masked_group_bce_with_nothing_known_is_zero_and_finite():
    logits = torch.randn(2, 1, 2, requires_grad=True)
    loss, n = masked_group_bce(logits, -torch.ones(2, 2), torch.ones(2, 1, dtype=torch.bool),
                               torch.ones(1, 2, dtype=torch.bool))
    loss.backward()
    assert float(loss.detach()) == 0.0 and int(n) == 0 and torch.isfinite(logits.grad).all()


def test_masked_group_bce_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes do not match"):
        masked_group_bce(torch.zeros(2, 3, 4), torch.zeros(2, 5), torch.ones(2, 3, dtype=torch.bool),
                         torch.ones(3, 4, dtype=torch.bool))


# ------------------------------------------------------------------ head + loss through the model


def test_aux_loss_trains_head_and_encoder(source):
    torch.manual_seed(0)
    n_labels = len(source.diagnoses)
    model = create_model("fvlm", _cfg(aux_classes=n_labels))
    b = _batch(source)
    out = model(b)
    assert out["aux"]["logits"].shape == (6, len(ANATS), n_labels)
    loss_fn = build_loss(LossConfig(calibration=[], aux_weight=0.5), ANATS, _groups(source))
    assert isinstance(loss_fn, WithAuxLoss)
    loss, logs = loss_fn(out, b)
    assert torch.allclose(loss, logs["loss/main"] + 0.5 * logs["loss/aux"])
    assert float(logs["n/aux_labels"]) > 0
    loss.backward()
    assert model.aux_head.w1.grad.abs().sum() > 0
    assert model.image_encoder.patch_embed.proj.weight.grad.abs().sum() > 0


def test_aux_loss_off_by_default_and_errors(source):
    assert LossConfig().aux_weight == 0
    assert not isinstance(build_loss(LossConfig(), ANATS, {}), WithAuxLoss)
    assert not isinstance(build_loss(LossConfig(aux_weight=1.0), [], {}), WithAuxLoss)   # global-only model
    with pytest.raises(ConfigError, match="aux_weight"):
        build_loss(LossConfig(aux_weight=-1.0), ANATS, {})
    model = create_model("fvlm", _cfg())                 # no head
    assert model.aux_head is None
    b = _batch(source, 3)
    with pytest.raises(FvlmError, match="aux_classes"):
        build_loss(LossConfig(aux_weight=1.0), ANATS, _groups(source))(model(b), b)
    with pytest.raises(ConfigError, match="aux_classes"):
        create_model("fvlm", _cfg(aux_classes=-2))


def test_zero_shot_embeddings_do_not_go_through_the_head(source):
    """Zero-shot compares encode_image with encode_text: scrambling the head changes neither."""
    torch.manual_seed(0)
    model = create_model("fvlm", _cfg(aux_classes=len(source.diagnoses))).eval()
    b = _batch(source, 4)
    prompts = ["There is a hyperdense lesion in the lung.", "The lung is normal."]
    with torch.no_grad():
        img0 = model.encode_image(b)
        txt0 = model.encode_text(prompts, anatomy="lung")
        logits0 = model.aux_logits(torch.stack([img0[a] for a in ANATS], 1))
        for p in model.aux_head.parameters():
            p.add_(torch.randn_like(p) * 5)
        img1 = model.encode_image(b)
        txt1 = model.encode_text(prompts, anatomy="lung")
        logits1 = model.aux_logits(torch.stack([img1[a] for a in ANATS], 1))
    assert not torch.allclose(logits0, logits1)          # the head did change
    for a in ANATS:
        assert torch.equal(img0[a], img1[a])
    assert torch.equal(txt0, txt1)


# ------------------------------------------------------------------ pooling


def _pool(kind, topk=1, heads=1):
    torch.manual_seed(0)
    return _QueryPool(2, 8, heads, kind, topk).eval()


@pytest.mark.parametrize("kind", ["query", "mean", "topk"])
def test_pooling_reads_only_masked_tokens(kind):
    pool = _pool(kind, topk=2)
    tok = torch.randn(2, 10, 8)
    mask = torch.zeros(2, 1, 10, dtype=torch.bool)
    mask[:, :, 2:6] = True
    qid = torch.zeros(2, 1, dtype=torch.long)
    y = pool(tok, mask, qid)
    tok2 = tok.clone()
    tok2[:, 6:] = 50 * torch.randn(2, 4, 8)
    assert y.shape == (2, 1, 8)
    assert torch.allclose(y, pool(tok2, mask, qid), atol=1e-6)


def test_mean_and_topk_pooling_values():
    pool = _pool("mean")
    tok = torch.randn(1, 6, 8)
    mask = torch.tensor([[[True, True, False, True, False, False]]])
    qid = torch.zeros(1, 1, dtype=torch.long)
    v = pool.v(pool.norm(tok))[0]
    assert torch.allclose(pool(tok, mask, qid)[0, 0], v[[0, 1, 3]].mean(0), atol=1e-6)
    pool.kind, pool.topk = "topk", 1
    assert torch.allclose(pool(tok, mask, qid)[0, 0], v[[0, 1, 3]].max(0).values, atol=1e-6)
    pool.topk = 2
    assert torch.allclose(pool(tok, mask, qid)[0, 0], v[[0, 1, 3]].topk(2, dim=0).values.mean(0), atol=1e-6)
    pool.topk = 5   # more than the 3 masked tokens: their mean, never a -inf
    assert torch.allclose(pool(tok, mask, qid)[0, 0], v[[0, 1, 3]].mean(0), atol=1e-6)


def test_max_pooling_keeps_one_token_that_mean_dilutes():
    """A finding in one token of 64: max pooling moves by the token's change, the mean by 1/64 of it."""
    pool = _pool("topk", topk=1)
    with torch.no_grad():
        pool.v.weight.copy_(torch.eye(8))
        pool.v.bias.zero_()
    tok = torch.randn(1, 64, 8) * 0.1
    tok[0, :, 0] = torch.linspace(-1, 1, 64)                 # keeps the LayerNorm from flattening channel 0
    hot = tok.clone()
    hot[0, 17, 1] = 20.0
    mask = torch.ones(1, 1, 64, dtype=torch.bool)
    qid = torch.zeros(1, 1, dtype=torch.long)
    d_max = (pool(hot, mask, qid) - pool(tok, mask, qid))[0, 0, 1]
    pool.kind = "mean"
    d_mean = (pool(hot, mask, qid) - pool(tok, mask, qid))[0, 0, 1]
    assert d_max > 10 * d_mean > 0


@pytest.mark.parametrize("kind", ["mean", "topk"])
def test_model_with_pooling_choice_trains(source, kind):
    model = create_model("fvlm", _cfg(pool=kind, pool_topk=2))
    assert not hasattr(model.pool, "q")                      # no parameter that never gets a gradient
    b = _batch(source, 4)
    loss, _ = build_loss(LossConfig(calibration=[]), ANATS, {})(model(b), b)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_pooling_bad_choices():
    with pytest.raises(ConfigError, match="model.image.pool must be"):
        _QueryPool(1, 8, 1, "attention")
    with pytest.raises(ConfigError, match="pool_topk"):
        _QueryPool(1, 8, 1, "topk", 0)


# ------------------------------------------------------------------ the demo's evaluation split


def test_eval_corpus_config_other_patients_same_variants():
    from fvlm.commands.demo import DemoConfig, eval_corpus_config
    from fvlm.demo.generate import load_preset, load_templates, make_variants

    cfg = DemoConfig(corpus="quick", seed=3, eval_cases=40)
    ev = eval_corpus_config(cfg)
    assert ev.seed != cfg.seed and ev.variant_seed == cfg.seed and ev.id_prefix == "eval"
    assert set(ev.splits) == {"val", "test"} and round(ev.n_cases * ev.splits["test"]) == 40
    templates = load_templates()
    train = load_preset("quick")
    train.seed = 3
    a, b = make_variants(train, templates), make_variants(ev, templates)
    ev.variant_seed = None
    c = make_variants(ev, templates)
    assert all(np.array_equal(x.hu, y.hu) for x, y in zip(a["abdomen"], b["abdomen"]))
    assert not all(np.array_equal(x.hu, y.hu) for x, y in zip(a["abdomen"][1:], c["abdomen"][1:]))
    with pytest.raises(FvlmError, match="eval_cases"):
        eval_corpus_config(DemoConfig(eval_cases=-1))


def test_eval_corpus_ids_and_bad_prefix(tmp_path):
    from fvlm.demo.generate import generate_corpus, load_preset

    g = load_preset("quick")
    g.n_cases, g.id_prefix, g.splits = 3, "eval", {"val": 0.2, "test": 0.8}
    info = generate_corpus(tmp_path / "e", config=g)
    rows = (tmp_path / "e" / "manifest.csv").read_text().splitlines()[1:]
    assert info["n_cases"] == 3 and all(r.startswith("eval0") for r in rows)
    g.id_prefix = "../x"
    with pytest.raises(FvlmError, match="id_prefix"):
        generate_corpus(tmp_path / "f", config=g)


def test_demo_eval_cases_flag():
    from fvlm.cli import resolve_config
    from fvlm.commands import demo

    p = argparse.ArgumentParser()
    p.add_argument("--config", action="append", default=[])
    p.add_argument("--set", action="append", default=[])
    demo.add_arguments(p)
    args = p.parse_args(["--eval-cases", "350"])
    assert resolve_config(args, demo.SCHEMA, demo.DEFAULT_CONFIG).eval_cases == 350
    assert resolve_config(p.parse_args([]), demo.SCHEMA, demo.DEFAULT_CONFIG).eval_cases == 0
