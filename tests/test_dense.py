"""Dense heads: shapes (2D/3D), metrics against hand-computed cases, losses, prompt-order
invariance of the class aggregation, checkpoints, and the bad-input paths."""
import json

import numpy as np
import pytest
import torch

from fvlm.models.text_seg import ClassAggregation, TextSegHead
from fvlm.models.dense_heads import SegHead, upsample_plan
from fvlm.dense.metrics import (SegmentationMeter, binary_dice_iou, confusion_counts, dice_iou_from_counts,
                                per_class_dice_iou, pointing_chance, pointing_game, pointing_p_value)
from fvlm.encoders import create_encoder
from fvlm.errors import FvlmError

torch.set_num_threads(2)

CASES = [(2, (32, 32), (8, 8)), (3, (32, 32, 16), (8, 8, 4)), (2, (32, 48), (16, 8))]


# --------------------------------------------------------------------------- metrics


def test_dice_iou_hand_computed():
    # class 1: pred 3 voxels, target 2, overlap 2 -> Dice 4/5, IoU 2/3
    # class 2: pred 1, target 2, overlap 1 -> Dice 2/3, IoU 1/2
    # class 3: absent in both -> undefined
    t = np.array([[1, 1, 2, 2], [0, 0, 0, 0]])
    p = np.array([[1, 1, 2, 1], [0, 0, 0, 0]])
    d, i = per_class_dice_iou(p, t, 4)
    assert d[0] == pytest.approx(0.8) and i[0] == pytest.approx(2 / 3)
    assert d[1] == pytest.approx(2 / 3) and i[1] == pytest.approx(0.5)
    assert np.isnan(d[2]) and np.isnan(i[2])
    c = confusion_counts(p, t, 4)
    assert c[1].tolist() == [2, 1, 0] and c[2].tolist() == [1, 0, 1]


def test_binary_dice_false_positive_only_is_zero():
    t = np.zeros((4, 4), bool)
    p = np.zeros((4, 4), bool)
    p[0, 0] = True
    assert binary_dice_iou(p, t) == (0.0, 0.0)
    d, i = binary_dice_iou(t, t)
    assert np.isnan(d) and np.isnan(i)


def test_meter_per_case_vs_pooled():
    m = SegmentationMeter(["a"])
    m.update(np.array([1, 1, 1, 1, 0, 0]), np.array([1, 1, 1, 1, 0, 0]), "c1")  # Dice 1
    m.update(np.array([1, 0, 0, 0]), np.array([0, 1, 1, 1]), "c2")  # Dice 0
    s = m.summary()
    assert s["per_class"]["a"]["dice"] == pytest.approx(0.5)  # mean over cases
    # pooled: tp 4, fp 1, fn 3 -> 8 / 12; IoU 4 / 8
    assert s["per_class"]["a"]["dice_global"] == pytest.approx(2 / 3, abs=1e-6)
    assert s["per_class"]["a"]["iou_global"] == pytest.approx(0.5, abs=1e-6)
    assert s["n_cases"] == 2
    json.dumps(s)  # JSON-safe (no nan)


def test_meter_mean_over_present_classes():
    m = SegmentationMeter(["a", "b", "c"])
    t = np.array([0, 1, 1, 2, 2, 0])
    p = np.array([3, 1, 1, 2, 0, 0])  # a perfect, b half found, c never in the target but predicted
    m.update(p, t)
    s = m.summary()
    assert s["per_class"]["c"]["dice"] == 0.0 and s["per_class"]["c"]["support_voxels"] == 0
    assert s["mean"]["dice"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert s["mean_present"]["dice"] == pytest.approx((1 + 2 / 3) / 2)


def test_pointing_game_and_chance():
    h = np.zeros((5, 5))
    m = np.zeros((5, 5), bool)
    m[1:3, 1:3] = True
    h[2, 2] = 1.0
    assert pointing_game(h, m)
    h2 = np.zeros((5, 5))
    h2[4, 4] = 1.0
    assert not pointing_game(h2, m)
    h3 = np.zeros((5, 5))
    h3[3, 2] = 1.0
    assert not pointing_game(h3, m) and pointing_game(h3, m, tolerance=1)
    assert pointing_chance(m) == pytest.approx(4 / 25)
    body = np.zeros((5, 5), bool)
    body[:, :2] = True  # 10 voxels, 2 of them in the mask
    assert pointing_chance(m, candidates=body) == pytest.approx(0.2)
    # the maximum outside the candidates is ignored
    h4 = np.zeros((5, 5))
    h4[4, 4], h4[1, 1] = 1.0, 0.5
    assert pointing_game(h4, m, candidates=body)


def test_pointing_p_value_hand_computed():
    # P(X >= 3), X ~ Bin(10, 0.1) = 1 - 0.9^10 - 10 * 0.1 * 0.9^9 - 45 * 0.01 * 0.9^8
    assert pointing_p_value(3, 10, 0.1) == pytest.approx(0.0701908264, abs=1e-9)
    assert pointing_p_value(2, 2, 0.5) == pytest.approx(0.25)
    assert pointing_p_value(0, 7, 0.3) == pytest.approx(1.0)


def test_metric_bad_inputs():
    with pytest.raises(ValueError, match="differs"):
        per_class_dice_iou(np.zeros((2, 2)), np.zeros((2, 3)), 2)
    with pytest.raises(ValueError, match="label ids"):
        confusion_counts(np.array([0, 3]), np.array([0, 1]), 2)
    with pytest.raises(ValueError, match="non-empty"):
        pointing_game(np.zeros((3, 3)), np.zeros((3, 3), bool))


def test_dice_from_counts_nan_only_when_empty():
    d, i = dice_iou_from_counts(np.array([[0, 0, 0], [0, 2, 0], [0, 0, 3]]))
    assert np.isnan(d[0]) and d[1] == 0 and d[2] == 0


# --------------------------------------------------------------------------- heads


def test_upsample_plan():
    assert upsample_plan((8, 8, 4)) == [(2, 2, 2), (2, 2, 2), (2, 2, 1)]
    assert upsample_plan((16, 16)) == [(2, 2)] * 4
    assert upsample_plan((32, 16, 16))[-1] == (2, 1, 1)
    assert upsample_plan((12, 4)) == [(2, 2), (2, 2), (3, 1)]


@pytest.mark.parametrize("sd,img,patch", CASES)
def test_seg_head_shapes(sd, img, patch):
    enc = create_encoder(f"vit{sd}d_nano", img_size=img, patch_size=patch)
    x = torch.randn(2, 1, *img)
    feats = enc.forward_intermediates(x, [0, 1, 3])
    head = SegHead(sd, enc.embed_dim, patch, 3, num_classes=5, base_channels=16, min_channels=8, stem_channels=4)
    out = head(feats, x)
    assert out.shape == (2, 5, *img)
    out.sum().backward()  # gradients reach the encoder
    assert enc.patch_embed.proj.weight.grad is not None


@pytest.mark.parametrize("sd,img,patch", CASES[:2])
def test_interp_upsampling_heads_have_no_transposed_convs(sd, img, patch):
    torch.manual_seed(0)
    enc = create_encoder(f"vit{sd}d_nano", img_size=img, patch_size=patch)
    x = torch.randn(2, 1, *img)
    feats = enc.forward_intermediates(x, [1, 3])
    seg = SegHead(sd, enc.embed_dim, patch, 2, num_classes=3, base_channels=16, min_channels=8, stem_channels=4,
                  upsample="interp")
    txt = TextSegHead(sd, enc.embed_dim, patch, 2, text_dim=24, cost_dim=16, agg_dim=8, guide_dim=8,
                      text_guide_dim=8, min_channels=4, stem_channels=4, learned_stages=2, upsample="interp")
    assert seg(feats, x).shape == (2, 3, *img)
    assert txt(feats, x, torch.randn(4, 1, 24)).shape == (2, 4, *img)
    for head in (seg, txt):
        assert not any(isinstance(m, (torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)) for m in head.modules())
    with pytest.raises(ValueError):
        SegHead(sd, enc.embed_dim, patch, 2, num_classes=3, upsample="pixelshuffle")


def test_anatomy_crops_centre_on_the_organ_not_the_lesion():
    from fvlm.dense.data import DenseCase, Finding, anatomy_crops

    img = np.zeros((40, 40, 20), np.float32)
    lab = np.zeros(img.shape, np.uint8)
    lab[20:36, 4:20, 5:15] = 2  # "liver" = class 2
    les = np.zeros(img.shape, bool)
    les[30:33, 5:8, 6:9] = True
    far = np.zeros(img.shape, bool)
    far[0:2, 38:40, 0:2] = True  # outside the crop: dropped
    case = DenseCase("c", img, lab, findings=[Finding("mass", les, "liver"), Finding("x", far, "liver"),
                                              Finding("y", les, "heart")])
    crops = anatomy_crops([case], ["lung", "liver"], (16, 16, 8))
    assert len(crops) == 1 and crops[0].case_id == "c:liver"
    c = crops[0]
    assert c.image.shape == (16, 16, 8) and c.label.shape == (16, 16, 8)
    assert [f.text for f in c.findings] == ["mass"] and c.findings[0].mask.sum() == les.sum()
    assert (c.label == 2).all()  # centred on the organ's bounding box (16 x 16 x 10 organ)


class _BrightSpots(torch.nn.Module):
    """A stand-in text model that marks every voxel brighter than 0.9, whatever the prompt."""
    task, spatial_dims = "text", 3

    def __init__(self, class_names, img_size):
        super().__init__()
        self.class_names = list(class_names)
        self.encoder = torch.nn.Module()
        self.encoder.img_size = tuple(img_size)

    def forward(self, x, text):
        return ((x > 0.9).float() * 20 - 10).repeat(1, text.shape[0], *([1] * (x.ndim - 2)))


def _organ_volume(cid, organ_label, lesion_bright, anatomy):
    """48 x 48 x 24 body (0.5) with an organ box [8:40, 8:40, 4:20], a 4^3 lesion at its centre (bright = 0.95
    or invisible) and, when the lesion is invisible, a bright spot elsewhere in the organ."""
    from fvlm.dense.data import DenseCase, Finding

    img = np.full((48, 48, 24), 0.5, np.float32)
    lab = np.zeros(img.shape, np.uint8)
    lab[8:40, 8:40, 4:20] = organ_label
    les = np.zeros(img.shape, bool)
    les[22:26, 22:26, 10:14] = True
    if lesion_bright:
        img[les] = 0.95
    else:
        img[10:12, 10:12, 5:7] = 0.95
    far = np.zeros(img.shape, bool)
    far[0:3, 0:3, 0:3] = True
    return DenseCase(cid, img, lab, findings=[Finding(f"{cid} lesion", les, anatomy),
                                              Finding("heart lesion", far, "heart")])  # heart: not a class


def test_organ_crop_eval_finds_bright_lesions_and_tests_against_chance(tmp_path):
    """eval.crops=organ: one model-sized crop per finding anatomy; 2 of 4 lesions visible -> 2 hits,
    p-value = P(X >= 2) for X ~ Bin(4, lesion fraction of the crop), by hand."""
    from fvlm.config import build
    from fvlm.dense.config import EvalConfig
    from fvlm.dense.data import anatomy_crops
    from fvlm.dense.evaluate import eval_cases, evaluate_model, write_eval
    from fvlm.encoders import TextEncoder

    classes = ["liver", "kidney"]
    vols = [_organ_volume("a", 1, True, "liver"), _organ_volume("b", 2, True, "kidney"),
            _organ_volume("c", 1, False, "liver"), _organ_volume("d", 2, False, "kidney")]
    model = _BrightSpots(classes, (32, 32, 16))
    assert eval_cases(model, vols, "whole") == vols
    crops = eval_cases(model, vols, "organ")
    want = anatomy_crops(vols, classes, (32, 32, 16))
    assert [c.case_id for c in crops] == [c.case_id for c in want] == ["a:liver", "b:kidney", "c:liver", "d:kidney"]
    for c in crops:
        assert c.image.shape == c.label.shape == (32, 32, 16)
        assert [f.anatomy for f in c.findings] == [c.case_id[2:]] and c.findings[0].mask.sum() == 64
    ecfg = build(EvalConfig, {"tolerance": 0, "overlap": 0.0, "crops": "organ",
                              "paraphrases": {"kidney": "renal parenchyma", "lung": "not a class here"}})
    res = evaluate_model(model, {"meta": {"templates": ["{}"], "finding_texts": ["a lesion", "c lesion"]}}, crops, ecfg,
                         text_encoder=TextEncoder.tiny_random())
    assert res["prompts"] == {"liver": "liver", "kidney": "renal parenchyma"} and res["paraphrased"] == ["kidney"]
    g = res["grounding"]
    assert [f["hit"] for f in g["findings"]] == [True, True, False, False]
    assert [f["text_seen_in_training"] for f in g["findings"]] == [True, False, True, False]
    assert g["unseen_texts"] == {"n_findings": 2, "pointing_hits": 1, "pointing_game": 0.5}  # b (hit), d (miss)
    c = 64 / (32 * 32 * 16)  # every voxel is body
    assert g["pointing_hits"] == 2 and g["n_findings"] == 4 and g["chance_body"] == pytest.approx(c, abs=1e-6)
    assert g["p_value_vs_chance"] == pytest.approx(1 - (1 - c) ** 4 - 4 * c * (1 - c) ** 3, rel=1e-5)
    assert res["per_class"]["liver"]["support_voxels"] == 2 * 32 * 32 * 16  # the organ fills each crop
    # the text control: this model ignores the text, so another anatomy's finding text hits the same
    tc = g["text_control"]
    assert (tc["own_text_hits"], tc["control_text_hits"], tc["discordant_own_only"],
            tc["discordant_control_only"], tc["p_value_own_vs_control"]) == (2, 2, 0, 0, 1.0)
    jp, mp = write_eval(res, tmp_path, "x.pt", {"source": "demo", "n_cases": 4, "crops": "organ",
                                                "crop_size": [32, 32, 16], "n_volumes": 4})
    assert json.loads(jp.read_text())["grounding"]["p_value_vs_chance"] == g["p_value_vs_chance"]
    md = mp.read_text()
    assert "scored on: organ crops: 4 crops of 32×32×16 voxels" in md
    assert "| p vs body chance |" in md and f"| {g['p_value_vs_chance']:.3g} |" in md
    assert "| 4 | 2 | 2 | 0 | 0 | 1 |" in md  # the text-control row
    assert "paraphrase (wording not used in training, eval.paraphrases): kidney" in md


def test_text_control_texts_and_mcnemar_by_hand():
    from fvlm.dense.data import Finding
    from fvlm.dense.evaluate import _control_pool, _control_summary, _control_text

    vols = [_organ_volume("a", 1, True, "liver"), _organ_volume("b", 2, True, "kidney")]
    pool = _control_pool(vols)
    assert pool == [("heart", "heart lesion"), ("kidney", "b lesion"), ("liver", "a lesion")]
    for salt in range(4):
        t = _control_text(Finding("a lesion", np.ones(1, bool), "liver"), pool, salt)
        assert t in ("heart lesion", "b lesion")
    assert _control_text(Finding("x", np.ones(1, bool), "lung"), [("lung", "y")], 0) is None
    # 6 findings hit only with their own text, 1 only with the control, 3 with both:
    # P(X >= 6), X ~ Bin(7, 1/2) = (7 + 1) / 128
    s = _control_summary([(True, False)] * 6 + [(False, True)] + [(True, True)] * 3)
    assert (s["own_text_hits"], s["control_text_hits"], s["discordant_own_only"], s["discordant_control_only"]) == \
        (9, 4, 6, 1)
    assert s["p_value_own_vs_control"] == pytest.approx(8 / 128)


def test_organ_crops_need_a_3d_model_and_findings():
    from fvlm.dense.data import DenseCase
    from fvlm.dense.evaluate import eval_cases
    from fvlm.models.dense import build_dense_model

    vol = _organ_volume("a", 1, True, "liver")
    with pytest.raises(FvlmError, match="needs a 3D model"):
        eval_cases(build_dense_model(_cfg().model, ["liver"]), [vol], "organ")
    plain = DenseCase("p", vol.image, vol.label)  # no findings (e.g. the shipped sample)
    with pytest.raises(FvlmError, match="no case has a finding in a segmented anatomy"):
        eval_cases(_BrightSpots(["liver"], (32, 32, 16)), [plain], "organ")


@pytest.mark.parametrize("sd,img,patch", CASES[:2])
def test_text_head_shapes_and_prompt_order_invariance(sd, img, patch):
    torch.manual_seed(0)
    enc = create_encoder(f"vit{sd}d_nano", img_size=img, patch_size=patch).eval()
    head = TextSegHead(sd, enc.embed_dim, patch, 2, text_dim=24, cost_dim=16, agg_dim=8, guide_dim=8,
                       text_guide_dim=8, templates=2, min_channels=4, stem_channels=4).eval()
    x = torch.randn(2, 1, *img)
    text = torch.randn(5, 2, 24)
    with torch.no_grad():
        feats = enc.forward_intermediates(x, [1, 3])
        out = head(feats, x, text)
        perm = torch.tensor([3, 0, 4, 2, 1])
        out_p = head(feats, x, text[perm])
        out_sub = head(feats, x, text[:3])  # a different number of prompts works too
    assert out.shape == (2, 5, *img)
    assert out_sub.shape == (2, 3, *img)
    torch.testing.assert_close(out_p, out[:, perm], atol=1e-5, rtol=1e-4)


def test_class_aggregation_is_permutation_equivariant():
    torch.manual_seed(0)
    agg = ClassAggregation(8, 4, heads=2).eval()
    x = torch.randn(2, 6, 8, 3, 3)
    t = torch.randn(2, 6, 4)
    perm = torch.randperm(6)
    with torch.no_grad():
        torch.testing.assert_close(agg(x, t)[:, perm], agg(x[:, perm], t[:, perm]), atol=1e-5, rtol=1e-4)


def test_text_head_rejects_bad_prompt_tensor():
    head = TextSegHead(2, 96, (8, 8), 1, text_dim=24, templates=1)
    enc = create_encoder("vit2d_nano", img_size=(32, 32), patch_size=(8, 8))
    x = torch.randn(1, 1, 32, 32)
    feats = enc.forward_intermediates(x, [3])
    with pytest.raises(ValueError, match="template"):
        head(feats, x, torch.randn(3, 2, 24))
    with pytest.raises(ValueError, match="text embeddings"):
        head(feats, x, torch.randn(2, 3, 1, 24))  # batch 2 != 1
    with pytest.raises(ValueError, match="encoder levels"):
        head(feats * 2, x, torch.randn(3, 24))


# --------------------------------------------------------------------------- losses


def test_losses_behave():
    from fvlm.losses.dense import DiceCELoss, MixedSupervisionLoss, SoftmaxDiceLoss, pooled_logit

    y = torch.randint(0, 3, (2, 8, 8))
    perfect = torch.nn.functional.one_hot(y, 3).permute(0, 3, 1, 2).float() * 20
    assert SoftmaxDiceLoss()(perfect, y) < 1e-3
    assert DiceCELoss(focal_gamma=2.0)(perfect, y) < 1e-3
    assert DiceCELoss()(torch.zeros(2, 3, 8, 8), y) > 0.5
    # ignore_index: voxels marked 255 do not count
    y2 = y.clone()
    y2[:, :4] = 255
    wrong = perfect.clone()
    wrong[:, :, :4] = -perfect[:, :, :4]
    assert DiceCELoss(ignore_index=255)(wrong, y2) < 1e-3
    # mixed supervision: unknown voxels (weight 0) and unknown labels (-1) add nothing
    logits = torch.zeros(1, 2, 4, 4, requires_grad=True)
    mask = torch.zeros(1, 2, 4, 4)
    w = torch.zeros(1, 2, 4, 4)
    out = MixedSupervisionLoss()(logits, mask, w, torch.zeros(1, 2, dtype=torch.bool), -torch.ones(1, 2))
    assert float(out["loss"].detach()) == 0.0
    # Dice only on full rows with a non-empty mask: an empty full row is left to the voxel loss
    lg = torch.full((1, 2, 4, 4), -8.0)
    lg[0, 0, :2] = 8.0
    m = torch.zeros(1, 2, 4, 4)
    m[0, 0, :2] = 1.0
    out = MixedSupervisionLoss(label_weight=0)(lg, m, torch.ones_like(m), torch.ones(1, 2, dtype=torch.bool),
                                               -torch.ones(1, 2))
    assert float(out["dice"]) < 1e-3 and float(out["focal"]) < 1e-3
    lg[0, 0, :2] = -8.0  # the lesion row now misses: Dice sees it
    out = MixedSupervisionLoss(label_weight=0)(lg, m, torch.ones_like(m), torch.ones(1, 2, dtype=torch.bool),
                                               -torch.ones(1, 2))
    assert float(out["dice"]) > 0.85  # the empty row (loss ~0) is not averaged in (that would give ~0.44)
    s = pooled_logit(torch.full((1, 1, 4, 4), -3.0))
    assert float(s) == pytest.approx(-3.0, abs=1e-5)


def test_class_weighted_cross_entropy():
    from fvlm.losses.dense import DiceCELoss

    torch.manual_seed(0)
    logits, y = torch.randn(2, 3, 6, 6), torch.randint(0, 3, (2, 6, 6))
    w = torch.tensor([0.2, 1.0, 5.0])
    ce = torch.nn.functional.nll_loss(logits.log_softmax(1), y, weight=w, reduction="none").mean()
    got = DiceCELoss(dice_weight=0.0, ce_class_weight=w)(logits, y)
    assert float(got) == pytest.approx(float(ce), rel=1e-5)
    assert float(DiceCELoss(dice_weight=0.0)(logits, y)) != pytest.approx(float(got), rel=1e-3)


def test_class_weights_from_voxel_counts():
    from fvlm.dense.train import class_weights

    w = class_weights(np.array([900, 90, 9, 0]), cap=100.0)
    assert np.allclose(w, [1.0, np.sqrt(10), 10.0, 1.0])  # background 1; absent class 1
    assert np.allclose(class_weights(np.array([900, 90, 9, 0]), cap=3.0), [1.0, 3.0, 3.0, 1.0])


# --------------------------------------------------------------------------- crop sampling


def _lab_case(name, shape, boxes):
    from fvlm.dense.data import DenseCase

    lab = np.zeros(shape, np.uint8)
    for k, sl in boxes:
        lab[sl] = k
    return DenseCase(name, np.random.default_rng(0).random(shape).astype(np.float32), lab)


def test_class_balanced_centres_draw_each_class_equally():
    from fvlm.dense.data import ClassBalancedCentres, class_voxel_counts

    a = _lab_case("a", (20, 20, 10), [(1, np.s_[:, :, :5]), (2, np.s_[0:2, 0:2, 9])])  # 2000 and 4 voxels
    b = _lab_case("b", (16, 16, 8), [(3, np.s_[4:8, 4:8, 2:4]), (2, np.s_[10, 10, 5])])  # 32, and 1 of class 2
    cases = [a, b]
    assert class_voxel_counts(cases, 4).tolist() == [4000 - 2004 + 2048 - 33, 2000, 5, 32, 0]
    draw = ClassBalancedCentres(cases, 4)
    assert draw.classes == [1, 2, 3]
    rng = np.random.default_rng(0)
    got = []
    for _ in range(3000):
        ci, c = draw(rng, [x.image.shape for x in cases])
        got.append(int(cases[ci].label[tuple(c)]))
    freq = np.bincount(got, minlength=4) / len(got)
    assert freq[0] == 0 and np.allclose(freq[1:], 1 / 3, atol=0.04)  # not 2000 : 5 : 32
    # class 2: case a holds 4 of its 5 voxels, so it is drawn there ~4/5 of the time
    twos = [ci for ci, c in (draw(rng, [x.image.shape for x in cases]) for _ in range(3000))
            if cases[ci].label[tuple(c)] == 2]
    assert np.mean(np.array(twos) == 0) == pytest.approx(0.8, abs=0.06)
    assert ClassBalancedCentres([_lab_case("e", (4, 4, 4), [])], 2)(rng, [(4, 4, 4)]) is None


def test_sample_crop_at_a_given_centre():
    from fvlm.dense.data import sample_crop

    case = _lab_case("a", (40, 30, 20), [(1, np.s_[30, 5, 12])])
    img, lab, _, origin = sample_crop(case, (16, 16, 8), np.random.default_rng(0), 0.0, jitter=0.0,
                                      centre=np.array([30, 5, 12]))
    assert origin == (22, 0, 8) and lab[8, 5, 4] == 1 and lab.sum() == 1


# --------------------------------------------------------------------------- model, checkpoint, CLI errors


def _cfg(**model):
    from fvlm.config import build
    from fvlm.dense.config import DenseConfig

    base = {"encoder": "vit2d_nano", "img_size": [32, 32], "patch_size": [8, 8], "base_channels": 16,
            "min_channels": 8, "stem_channels": 4}
    return build(DenseConfig, {"model": {**base, **model}})


def test_dense_checkpoint_roundtrip(tmp_path):
    from fvlm.models.dense import build_dense_model, load_dense, save_dense

    cfg = _cfg()
    m = build_dense_model(cfg.model, ["liver", "spleen"]).eval()
    p = save_dense(tmp_path / "d.pt", m, cfg.model)
    m2, info = load_dense(p)
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), m2(x))
    assert info["class_names"] == ["liver", "spleen"] and info["task"] == "seg"


def test_load_pretrained_encoder_from_consolidated(tmp_path):
    """Encoder weights under 'image_encoder.' (the consolidated checkpoint layout) load; a freeze keeps them."""
    from fvlm.models.dense import build_dense_model

    src = create_encoder("vit2d_nano", img_size=(32, 32), patch_size=(8, 8))
    sd = {f"image_encoder.{k}": v for k, v in src.state_dict().items()}
    sd["text_proj.weight"] = torch.zeros(2, 2)
    torch.save({"format": "fvlm-checkpoint", "version": 1, "state_dict": sd}, tmp_path / "pre.pt")
    cfg = _cfg(pretrained=str(tmp_path / "pre.pt"), freeze_encoder=True)
    m = build_dense_model(cfg.model, ["liver"])
    torch.testing.assert_close(m.encoder.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    assert not any(p.requires_grad for p in m.encoder.parameters())
    m.train()
    assert not m.encoder.training and m.head.training



def test_partial_encoder_load_warns(tmp_path, caplog):
    """A checkpoint of a shallower encoder loads what fits and says loudly what did not."""
    from fvlm.models.dense import build_dense_model

    src = create_encoder("vit2d_nano", img_size=(32, 32), patch_size=(8, 8))
    sd = {f"image_encoder.{k}": v for k, v in src.state_dict().items() if not k.startswith("blocks.1.")}
    torch.save({"state_dict": sd}, tmp_path / "pre.pt")
    with caplog.at_level("WARNING", logger="fvlm.dense"):
        m = build_dense_model(_cfg(pretrained=str(tmp_path / "pre.pt")).model, ["liver"])
    assert "only partly initialised" in caplog.text and "blocks.1." in caplog.text
    torch.testing.assert_close(m.encoder.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_pretrained_spec_is_adopted_from_pretrain_and_xray_checkpoints(tmp_path):
    """`fvlm pretrain` (fvlm-model) and `fvlm pretrain-xray` (fvlm-xray-encoder) checkpoints name their
    encoder; the dense model takes family, patch size and arguments from them, keeping its img_size."""
    from fvlm.models.dense import adopt_pretrained_spec, build_dense_model

    src3 = create_encoder("vit3d_nano", img_size=(32, 32, 16), patch_size=(16, 16, 8), depth=2)
    torch.save({"format": "fvlm-model", "version": 1,
                "config": {"image": {"encoder": "vit3d_nano", "img_size": [32, 32, 16], "patch_size": [16, 16, 8],
                                     "encoder_args": {"depth": 2}}},
                "state_dict": {f"image_encoder.{k}": v for k, v in src3.state_dict().items()}}, tmp_path / "ct.pt")
    cfg = adopt_pretrained_spec(_cfg(encoder="vit3d_tiny", img_size=[64, 64, 32], patch_size=[8, 8, 4],
                                     pretrained=str(tmp_path / "ct.pt")).model)
    assert cfg.encoder == "vit3d_nano" and cfg.patch_size == [16, 16, 8] and cfg.encoder_args == {"depth": 2}
    m = build_dense_model(cfg, ["liver"])
    assert m.encoder.depth == 2 and m.encoder.img_size == (64, 64, 32)
    torch.testing.assert_close(m.encoder.blocks[1].mlp.fc1.weight, src3.blocks[1].mlp.fc1.weight)
    assert m(torch.rand(1, 1, 64, 64, 32)).shape == (1, 2, 64, 64, 32)

    src2 = create_encoder("vit2d_nano", img_size=(32, 32), patch_size=(8, 8))
    torch.save({"format": "fvlm-xray-encoder", "version": 1,
                "encoder_spec": {"name": "vit2d_nano", "img_size": [32, 32], "patch_size": [8, 8], "in_chans": 1,
                                 "kwargs": {}, "pixel_mean": [0.5], "pixel_std": [0.25]},
                "state_dict": {f"image_encoder.{k}": v for k, v in src2.state_dict().items()}}, tmp_path / "xr.pt")
    cfg2 = adopt_pretrained_spec(_cfg(img_size=[64, 64], pretrained=str(tmp_path / "xr.pt")).model)
    assert cfg2.input_norm == [0.5, 0.25]
    m2 = build_dense_model(cfg2, ["lung"])
    assert m2.input_norm == (0.5, 0.25)
    with pytest.raises(FvlmError, match="divisible"):
        adopt_pretrained_spec(_cfg(img_size=[36, 36], patch_size=[4, 4], pretrained=str(tmp_path / "xr.pt")).model)


def test_load_pretrained_errors(tmp_path):
    from fvlm.models.dense import build_dense_model, load_dense
    from fvlm.errors import FormatError

    torch.save({"state_dict": {"text.w": torch.zeros(1)}}, tmp_path / "x.pt")
    with pytest.raises(FormatError, match="image_encoder"):
        build_dense_model(_cfg(pretrained=str(tmp_path / "x.pt")).model, ["liver"])
    with pytest.raises(FvlmError, match="not found"):
        build_dense_model(_cfg(pretrained=str(tmp_path / "missing.pt")).model, ["liver"])
    with pytest.raises(FormatError, match="not a dense checkpoint"):
        load_dense(tmp_path / "x.pt")
    with pytest.raises(FvlmError, match="text_dim"):
        build_dense_model(_cfg(head="text").model, ["liver"])


def test_cli_errors(tmp_path, capsys):
    from fvlm.cli import main

    assert main(["dense", "eval", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "dense checkpoint not found" in capsys.readouterr().err
    assert main(["dense", "train", "--out", str(tmp_path / "o"), "--set", "data.classes=[livr]"]) == 2
    assert "not in anatomy set" in capsys.readouterr().err
    assert main(["dense", "train", "--out", str(tmp_path / "o"), "--set", "model.encoder=vit2d_nano"]) == 2
    assert "2 values" in capsys.readouterr().err
    assert main(["dense", "train", "--out", str(tmp_path / "o"), "--data", "shards"]) == 2
    assert "data.root" in capsys.readouterr().err


def test_ground_rejects_seg_checkpoint_and_bad_image(tmp_path, capsys):
    from fvlm.cli import main
    from fvlm.models.dense import build_dense_model, save_dense

    cfg = _cfg()
    p = save_dense(tmp_path / "d.pt", build_dense_model(cfg.model, ["liver"]), cfg.model)
    assert main(["dense", "ground", "--checkpoint", str(p), "--image", "x.png", "--text", "liver"]) == 2
    assert "grounding needs model.head=text" in capsys.readouterr().err


def test_ground_writes_pngs_for_xray_and_ct(tmp_path):
    """`fvlm dense ground` on a radiograph (2D text model) and a CT volume (3D text model)."""
    from fvlm.dense.ground import load_image, save_overlays
    from fvlm.models.dense import build_dense_model
    from fvlm.resources import samples_dir

    m = build_dense_model(_cfg(head="text", img_size=[32, 32]).model, ["lung"], text_dim=8).eval()
    png = sorted((samples_dir() / "cxr" / "images").glob("*.png"))[0]
    img, aff, info = load_image(png, m, {})
    assert img.shape == (32, 32) and aff is None and info["kind"] == "xray"
    with torch.no_grad():
        heat = torch.sigmoid(m(torch.from_numpy(img)[None, None], torch.randn(1, 8)))[0, 0].numpy()
    r = save_overlays(img, heat, "nodule in the right upper lobe", tmp_path / "x")
    assert (tmp_path / "x" / r["files"]["overlay_png"]).stat().st_size > 1000
    assert r["files"]["heatmap_png"] == "nodule_in_the_right_upper_lobe_heatmap.png"
    ct = (0.3 + 0.5 * np.random.default_rng(0).random((20, 18, 12))).astype(np.float32)
    ct[0] = 0.0  # air: outside the body, never the peak
    heat3 = np.zeros_like(ct)
    heat3[5, 6, 7] = 0.9
    heat3[0, 1, 1] = 1.0  # higher, but in the air
    r3 = save_overlays(ct, heat3, "liver", tmp_path / "c", affine=np.diag([3.0, 3.0, 3.0, 1.0]))
    assert r3["peak_voxel"] == [5, 6, 7] and r3["peak_mm_ras"] == [15.0, 18.0, 21.0]
    assert (tmp_path / "c" / "liver_heatmap.nii.gz").is_file()
    with pytest.raises(FvlmError, match="unsupported image type"):
        load_image(png.with_suffix(".csv") if png.with_suffix(".csv").exists() else samples_dir() / "cxr" / "labels.csv", m, {})
    m3 = build_dense_model(_cfg(head="text", encoder="vit3d_nano", img_size=[32, 32, 16],
                                patch_size=[8, 8, 4]).model, ["liver"], text_dim=8)
    with pytest.raises(FvlmError, match="3D model"):
        load_image(png, m3, {})


# --------------------------------------------------------------------------- text-head batches


def test_text_batch_slots_and_targets():
    """One step's prompts: class phrases with their masks, the finding slot (own lesion, or another crop's
    finding text as a known negative), an absent diagnosis (all-zero target), a report sentence
    (0 outside its anatomy, unknown inside, no image label)."""
    from fvlm.dense.data import DenseCase
    from fvlm.dense.train import _text_batch

    lab = np.zeros((8, 8, 4), np.uint8)
    lab[:4] = 1  # liver
    lab[4:, :4] = 2  # kidney
    les = np.zeros(lab.shape, bool)
    les[1:3, 1:3, 1:3] = True
    a = DenseCase("a", np.zeros(lab.shape, np.float32), lab, labels={"renal cyst": 0, "liver mass": 1},
                  sentences=[("liver", "A mass in the liver."), ("heart", "Cardiomegaly.")])
    b = DenseCase("b", np.zeros(lab.shape, np.float32), lab, labels={"renal cyst": 1, "liver mass": 0})
    crops = [{"image": a.image, "label": lab, "has_label": True, "findings": [("A mass in the liver.", les, "liver mass")],
              "case": a},
             {"image": b.image, "label": lab, "has_label": True, "findings": [], "case": b}]
    out = _text_batch(crops, ["liver", "kidney"], {"liver": "liver", "kidney": "kidney"}, set(), 2,
                      np.random.default_rng(0))
    k = out["k"]
    assert k == 5 and len(out["prompts"]) == 2 * k
    pa, pb = out["prompts"][:k], out["prompts"][k:]
    assert sorted(pa[:2]) == ["kidney", "liver"] and pa[:2] == pb[:2]
    for bi in range(2):
        for j in range(2):
            want = lab == (1 if pa[j] == "liver" else 2)
            assert torch.equal(out["mask"][bi, j].bool(), torch.from_numpy(want))
    # finding slot: a's own lesion; b has none -> a's text as a known negative (all zero, weight 1)
    assert pa[2] == pb[2] == "A mass in the liver."
    assert torch.equal(out["mask"][0, 2].bool(), torch.from_numpy(les)) and out["label"][0, 2] == 1
    assert out["mask"][1, 2].sum() == 0 and out["weight"][1, 2].min() == 1 and out["label"][1, 2] == 0
    # absent-diagnosis slot
    assert (pa[3], pb[3]) == ("renal cyst", "liver mass")
    assert out["mask"][:, 3].sum() == 0 and out["label"][:, 3].tolist() == [0, 0]
    # report slot: the heart sentence is dropped (not a class); b has no sentence -> no loss there
    assert pa[4] == "A mass in the liver." and not out["full"][:, 4].any() and out["label"][:, 4].tolist() == [-1, -1]
    assert torch.equal(out["weight"][0, 4].bool(), torch.from_numpy(lab != 1)) and out["weight"][1, 4].sum() == 0
    off = _text_batch(crops, ["liver", "kidney"], {"liver": "liver", "kidney": "kidney"}, set(), 2,
                      np.random.default_rng(0), sentences=False)
    assert off["k"] == 4
    # a case that has a liver mass elsewhere (image label 1, nothing in this crop): the text is not a negative here
    c = DenseCase("c", np.zeros(lab.shape, np.float32), lab, labels={"liver mass": 1, "renal cyst": 0})
    crops[1] = {"image": c.image, "label": lab, "has_label": True, "findings": [], "case": c}
    out = _text_batch(crops, ["liver", "kidney"], {"liver": "liver", "kidney": "kidney"}, set(), 2,
                      np.random.default_rng(0))
    assert out["prompts"][out["k"] + 2] == "A mass in the liver."
    assert out["weight"][1, 2].sum() == 0 and out["label"][1, 2] == -1 and not out["full"][1, 2]
    # extra negative finding slots from the training pool: only texts of diagnoses known absent for the case
    pool = [("A mass in the liver.", "liver mass"), ("Renal cyst.", "renal cyst"), ("Big heart.", "cardiomegaly")]
    out = _text_batch(crops, ["liver", "kidney"], {"liver": "liver", "kidney": "kidney"}, set(), 2,
                      np.random.default_rng(0), negatives=2, text_pool=pool)
    k = out["k"]
    assert k == 7
    for bi in range(2):
        assert out["prompts"][bi * k + 3:bi * k + 5] == ["Renal cyst.", "Renal cyst."]  # cardiomegaly: not labelled
        assert out["mask"][bi, 3:5].sum() == 0 and out["weight"][bi, 3:5].min() == 1
        assert out["label"][bi, 3:5].tolist() == [0, 0] and out["full"][bi, 3:5].all()
    assert out["prompts"][5] == "renal cyst" and out["prompts"][6] == "A mass in the liver."  # label, report slots
