"""Loss math: targets, calibration rules, masking and the CLIP special case."""
import math

import pytest
import torch
import torch.nn.functional as F

from fvlm.errors import ConfigError
from fvlm.losses import (STATUS_ABNORMAL, STATUS_NORMAL, STATUS_NOT_MENTIONED, CalibrationRule,
                         FineGrainedContrastiveLoss, LossConfig, PairContext, combine_pair_weights,
                         create_calibration, register_calibration, sigmoid_pair_loss, soft_infonce,
                         soft_targets)


def _emb(n, e=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, e, generator=g), dim=-1)


def clip_loss(img, txt, scale):
    logits = scale * img @ txt.t()
    y = torch.arange(img.shape[0])
    return 0.5 * (F.cross_entropy(logits, y) + F.cross_entropy(logits.t(), y))


def test_targets_rows_sum_to_one():
    w = torch.rand(6, 6)
    w.fill_diagonal_(1)
    t = soft_targets(w)
    assert torch.allclose(t.sum(1), torch.ones(6))
    st = torch.tensor([STATUS_NORMAL, STATUS_NORMAL, STATUS_ABNORMAL, STATUS_NOT_MENTIONED, STATUS_NORMAL])
    pw = combine_pair_weights(5, [create_calibration("normal").pair_weights(PairContext("x", st))])
    t = soft_targets(pw)
    assert torch.allclose(t.sum(1), torch.ones(5))
    # a normal row spreads its mass over the three normal rows
    assert torch.allclose(t[0], torch.tensor([1 / 3, 1 / 3, 0, 0, 1 / 3]))
    assert torch.allclose(t[2], torch.tensor([0.0, 0, 1, 0, 0]))


def test_uncalibrated_equals_clip():
    img, txt = _emb(7, seed=1), _emb(7, seed=2)
    scale = torch.tensor(1 / 0.07)
    ours = soft_infonce(scale * img @ txt.t(), torch.eye(7))
    assert torch.allclose(ours, clip_loss(img, txt, scale), atol=1e-6)
    loss = FineGrainedContrastiveLoss(LossConfig(calibration=[], global_weight=0.0), ["liver"])
    out = {"image": {"liver": img}, "text": {"liver": txt}, "valid": {"liver": torch.ones(7, dtype=torch.bool)},
           "logit_scale": scale}
    total, logs = loss(out, {"status": torch.full((7, 1), STATUS_NORMAL)})
    assert torch.allclose(total, clip_loss(img, txt, scale), atol=1e-6)


def test_calibration_off_ignores_status():
    img, txt = _emb(5, seed=3), _emb(5, seed=4)
    scale = torch.tensor(10.0)
    out = {"image": {"a": img}, "text": {"a": txt}, "valid": {"a": torch.ones(5, dtype=torch.bool)},
           "logit_scale": scale}
    l0, _ = FineGrainedContrastiveLoss(LossConfig(calibration=[]), ["a"])(out, {"status": torch.ones(5, 1).long()})
    l1, _ = FineGrainedContrastiveLoss(LossConfig(calibration=["normal"]), ["a"])(out, {"status": torch.ones(5, 1).long()})
    assert not torch.allclose(l0, l1)
    assert torch.allclose(l0, clip_loss(img, txt, scale), atol=1e-6)


def _pair_grads(calibration):
    """d loss / d similarity for the normal pair (0, 1), through the loss module.

    With one-hot texts, ``image @ text.T`` is the image matrix itself, so the gradient on
    ``image[i, j]`` is the gradient on the image-i / text-j similarity. Rows 0 and 1 are normal
    and already as similar to each other's text as to their own.
    """
    sim = torch.tensor([[0.9, 0.9, 0.1, -0.2],
                        [0.9, 0.9, 0.0, 0.3],
                        [0.2, -0.1, 0.8, 0.1],
                        [0.0, 0.1, 0.2, 0.7]], requires_grad=True)
    txt = torch.eye(4)
    status = torch.tensor([STATUS_NORMAL, STATUS_NORMAL, STATUS_ABNORMAL, STATUS_ABNORMAL])
    loss = FineGrainedContrastiveLoss(LossConfig(calibration=calibration), ["a"])
    total, _ = loss({"image": {"a": sim}, "text": {"a": txt}, "valid": {"a": torch.ones(4, dtype=torch.bool)},
                     "logit_scale": torch.tensor(10.0)}, {"status": status[:, None]})
    total.backward()
    return float(sim.grad[0, 1]), float(sim.grad[1, 0]), float(sim.grad[2, 3])


def test_normal_pairs_not_pushed_apart():
    g01, g10, g23 = _pair_grads([])
    assert g01 > 0 and g10 > 0           # plain CLIP: a gradient step lowers the normal pair's similarity
    c01, c10, c23 = _pair_grads(["normal"])
    assert c01 <= 0 and c10 <= 0          # calibrated: not pushed apart (here: pulled together)
    assert c23 > 0                        # abnormal rows stay negatives of each other


def test_absent_anatomies_contribute_nothing():
    img, txt = _emb(6, seed=7), _emb(6, seed=8)
    valid = torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.bool)
    loss = FineGrainedContrastiveLoss(LossConfig(calibration=[], global_weight=0.0), ["a"])
    scale = torch.tensor(7.0)
    img = img.clone().requires_grad_(True)
    total, logs = loss({"image": {"a": img}, "text": {"a": txt}, "valid": {"a": valid}, "logit_scale": scale},
                       {})
    ref = clip_loss(img[valid], txt[valid], scale)
    assert torch.allclose(total, ref, atol=1e-6)
    total.backward()
    assert torch.all(img.grad[~valid] == 0)
    assert float(logs["n/a"]) == 4
    # an anatomy present in fewer than min_valid rows is skipped entirely
    only_one = torch.tensor([1, 0, 0, 0, 0, 0], dtype=torch.bool)
    total, logs = loss({"image": {"a": img, "b": img}, "text": {"a": txt, "b": txt},
                        "valid": {"a": valid, "b": only_one}, "logit_scale": scale}, {})
    # (its log is 0 and its count says why: the loss never waits for the host to decide)
    assert float(logs["loss/b"]) == 0 and float(logs["n/b"]) == 1 and torch.allclose(total, ref, atol=1e-6)


def test_anatomy_weighting_and_global():
    scale = torch.tensor(5.0)
    imgs = {"a": _emb(6, seed=9), "b": _emb(6, seed=10), "global": _emb(6, seed=11)}
    txts = {"a": _emb(6, seed=12), "b": _emb(6, seed=13), "global": _emb(6, seed=14)}
    valid = {"a": torch.ones(6, dtype=torch.bool), "b": torch.tensor([1, 1, 0, 0, 0, 0], dtype=torch.bool),
             "global": torch.ones(6, dtype=torch.bool)}
    out = {"image": imgs, "text": txts, "valid": valid, "logit_scale": scale}
    la = clip_loss(imgs["a"], txts["a"], scale)
    lb = clip_loss(imgs["b"][:2], txts["b"][:2], scale)
    lg = clip_loss(imgs["global"], txts["global"], scale)
    eq = FineGrainedContrastiveLoss(LossConfig(calibration=[], global_weight=0.5), ["a", "b"])(out, {})[0]
    assert torch.allclose(eq, (la + lb) / 2 + 0.5 * lg, atol=1e-6)
    cnt = FineGrainedContrastiveLoss(LossConfig(calibration=[], global_weight=0.5, anatomy_weighting="count"),
                                     ["a", "b"])(out, {})[0]
    assert torch.allclose(cnt, (6 * la + 2 * lb) / 8 + 0.5 * lg, atol=1e-6)


def test_disease_rule_exact_and_partial():
    st = torch.full((4,), STATUS_ABNORMAL)
    st[3] = STATUS_NORMAL
    labels = torch.tensor([[1, 0, 1], [1, 0, 1], [1, 0, 0], [0, 0, 0]]).float()
    exact = create_calibration("disease").pair_weights(PairContext("x", st, labels))
    assert exact[0, 1] == 1 and exact[0, 2] == 0 and exact[0, 3] == 0
    part = create_calibration("disease", partial=1.0).pair_weights(PairContext("x", st, labels))
    assert part[0, 2] == pytest.approx(0.5) and part[1, 0] == 1 and part[3, 3] == 0
    # uncertain labels (-1) do not make a positive
    unc = torch.tensor([[1, -1, 0], [1, 0, 0]]).float()
    w = create_calibration("disease").pair_weights(PairContext("x", torch.full((2,), STATUS_ABNORMAL), unc))
    assert w[0, 1] == 1


def test_text_rule_threshold():
    ref = torch.tensor([[1.0, 0.0], [0.99, 0.01], [0.0, 1.0]])
    w = create_calibration("text", threshold=0.98).pair_weights(PairContext("x", torch.zeros(3).long(), None, ref))
    assert w[0, 1] == 1 and w[0, 2] == 0
    # no reference features: rule is a no-op
    assert create_calibration("text").pair_weights(PairContext("x", torch.zeros(3).long())) is None


def test_new_rule_is_one_class():
    @register_calibration
    class SamePatient(CalibrationRule):
        name = "test_everything"

        def pair_weights(self, ctx):
            return torch.full((ctx.n, ctx.n), 0.5)

    loss = FineGrainedContrastiveLoss(LossConfig(calibration=["test_everything"]), ["a"])
    pw = loss.pair_weights(PairContext("a", torch.zeros(3).long()))
    assert torch.allclose(soft_targets(pw)[0], torch.tensor([0.5, 0.25, 0.25]))


def test_bad_calibration_config():
    with pytest.raises(ConfigError, match="unknown calibration rule 'nromal'"):
        FineGrainedContrastiveLoss(LossConfig(calibration=["nromal"]), ["a"])
    with pytest.raises(ConfigError, match="calibration_options.text"):
        FineGrainedContrastiveLoss(LossConfig(calibration=["text"], calibration_options={"text": {"thr": 1}}), ["a"])
    with pytest.raises(ConfigError, match="threshold"):
        create_calibration("text", threshold=1.5)


def test_sigmoid_loss():
    img, txt = _emb(5, seed=15), _emb(5, seed=16)
    logits = 10 * img @ txt.t() - 5
    ref = -F.logsigmoid((2 * torch.eye(5) - 1) * logits).sum() / 5
    assert torch.allclose(sigmoid_pair_loss(logits, torch.eye(5)), ref, atol=1e-5)
    loss = FineGrainedContrastiveLoss(LossConfig(kind="sigmoid", calibration=[]), ["a"])
    out = {"image": {"a": img}, "text": {"a": txt}, "valid": {"a": torch.ones(5, dtype=torch.bool)},
           "logit_scale": torch.tensor(10.0), "logit_bias": torch.tensor(-5.0)}
    assert torch.allclose(loss(out, {})[0], ref, atol=1e-5)


def test_collapsed_loss_is_log_n():
    # identical embeddings: the loss is ln(N) -- the collapse signature the model's centring avoids
    e = F.normalize(torch.ones(8, 4), dim=-1)
    assert soft_infonce(10 * e @ e.t(), torch.eye(8)).item() == pytest.approx(math.log(8), rel=1e-5)


def _loss_inputs(B=10, anats=("a", "b", "c", "d"), E=8, F_=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    names = list(anats) + ["global"]
    img = {n: F.normalize(torch.randn(B, E, generator=g), dim=-1).requires_grad_(True) for n in names}
    txt = {n: F.normalize(torch.randn(B, E, generator=g), dim=-1).requires_grad_(True) for n in names}
    valid = {n: torch.rand(B, generator=g) > 0.3 for n in names}
    valid[anats[1]] = torch.zeros(B, dtype=torch.bool)
    valid[anats[1]][3] = True                        # fewer than min_valid rows: does not count
    valid["global"] = torch.ones(B, dtype=torch.bool)
    ref = {n: torch.randn(B, F_, generator=g) for n in anats[:2]}   # text_ref for some names only
    ref[anats[0]][1] = ref[anats[0]][0] * 2          # a text-rule positive pair
    batch = {"status": torch.randint(0, 3, (B, len(anats)), generator=g),
             "global_status": torch.randint(0, 3, (B,), generator=g),
             "labels": torch.randint(-1, 2, (B, 6), generator=g).float()}
    out = {"image": img, "text": txt, "valid": valid, "text_ref": ref, "logit_scale": torch.tensor(7.0),
           "logit_bias": torch.tensor(-2.0)}
    return out, batch


LOSS_CASES = [
    dict(),
    dict(calibration=["normal", "disease", "text"], calibration_options={"text": {"threshold": 0.9},
                                                                         "disease": {"partial": 0.5}}),
    dict(kind="sigmoid", calibration=["normal", "disease"], anatomy_weighting="count", global_weight=0.5),
    dict(calibration=["normal"], calibrate_global=False, anatomy_weighting="count", min_valid=5),
    dict(global_weight=0.0, anatomy_weight=2.0, calibration=["text"]),
    dict(anatomy_weight=0.0),
]


@pytest.mark.parametrize("case", range(len(LOSS_CASES)))
def test_stacked_loss_equals_the_per_name_loss(case):
    """One masked computation over all names == the old per-name loss over each name's valid rows."""
    from loss_reference import per_name_loss

    cfg = LossConfig(**LOSS_CASES[case])
    loss = FineGrainedContrastiveLoss(cfg, ["a", "b", "c", "d"], {"a": [0, 1], "c": [2, 3, 4], "global": [0, 5]})
    results = []
    for fn in (loss, lambda o, b: per_name_loss(loss, o, b)):
        out, batch = _loss_inputs()
        total, logs = fn(out, batch)
        total.backward()
        grads = {k: out[k][n].grad for k in ("image", "text") for n in out[k]}
        results.append((total.detach(), logs, grads))
    (t_new, l_new, g_new), (t_old, l_old, g_old) = results
    assert torch.allclose(t_new, t_old, atol=1e-6, rtol=1e-6), (t_new, t_old)
    for k, v in l_old.items():
        assert torch.allclose(l_new[k], v.to(l_new[k].dtype), atol=1e-6), k
    for k in l_new.keys() - l_old.keys():           # names that do not count log 0 (old: no key)
        assert k.startswith("loss/") and float(l_new[k]) == 0, k
    for k, g in g_old.items():
        if g is None:
            assert g_new[k] is None or torch.all(g_new[k] == 0), k
        else:
            assert torch.allclose(g_new[k], g, atol=1e-6), k


def test_stacked_input_equals_per_name_dicts():
    out, batch = _loss_inputs()
    loss = FineGrainedContrastiveLoss(LossConfig(calibration=["normal", "text"]), ["a", "b", "c", "d"])
    names = list(out["image"])
    ref = torch.stack([out["text_ref"].get(n, torch.zeros(10, 5)) for n in names], dim=1)
    stacked = {"names": names, "image": torch.stack([out["image"][n] for n in names], 1),
               "text": torch.stack([out["text"][n] for n in names], 1),
               "valid": torch.stack([out["valid"][n] for n in names], 1), "text_ref": ref,
               "has_ref": [n in out["text_ref"] for n in names]}
    a, _ = loss(out, batch)
    b, _ = loss({"stacked": stacked, "logit_scale": out["logit_scale"]}, batch)
    assert torch.equal(a, b)


def test_masked_losses_equal_row_selection():
    from fvlm.losses.targets import masked_sigmoid_pair_loss, masked_soft_infonce

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 7, 7, generator=g) * 5
    pw = torch.rand(3, 7, 7, generator=g) * (torch.rand(3, 7, 7, generator=g) > 0.6)
    mask = torch.rand(3, 7, generator=g) > 0.4
    mask[2] = False                                   # no valid row: 0, finite gradient
    logits.requires_grad_(True)
    pw = torch.maximum(pw, torch.eye(7).expand(3, 7, 7))     # pair weights always hold the true pair
    got_i, got_s = masked_soft_infonce(logits, pw, mask), masked_sigmoid_pair_loss(logits, pw, mask)
    for k in range(2):
        v = mask[k]
        assert torch.allclose(got_i[k], soft_infonce(logits[k][v][:, v], pw[k][v][:, v]), atol=1e-6)
        assert torch.allclose(got_s[k], sigmoid_pair_loss(logits[k][v][:, v], pw[k][v][:, v]), atol=1e-5)
    assert got_i[2] == 0 and got_s[2] == 0
    (got_i.sum() + got_s.sum()).backward()
    assert torch.isfinite(logits.grad).all() and torch.all(logits.grad[2] == 0)
