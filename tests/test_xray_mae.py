"""X-ray MAE network on the shared encoder, trained by the shared DeepSpeed engine on real radiographs; the command."""
import csv
import json

import pytest
import torch

from fvlm.config import load_config
from fvlm.errors import ConfigError, FvlmError
from fvlm.models.xray_mae import XrayMAE, build_xray_mae, load_encoder, save_encoder
from fvlm.xray import masking
from fvlm.xray.config import XrayPretrainConfig


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids oversubscription stalls."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TINY = dict(encoder="vit2d_nano", decoder_dim=64, decoder_depth=1, decoder_heads=4)


def test_mae_shapes_keep_and_all_tokens():
    torch.manual_seed(0)
    m = XrayMAE(img_size=128, patch_size=16, **TINY)
    x = torch.rand(2, 1, 128, 128)
    s = masking.random_masking(2, 64, 0.75)
    out = m(x, keep=s.keep)
    assert out["pred"].shape == (2, 64, 256)
    assert out["latent"].shape == (2, 1 + 16, 96)
    assert m(x)["pred"].shape == (2, 64, 256)  # GMML: every token
    assert m.features(x).shape == (2, 96)


def test_high_resolution_shapes_and_other_sizes():
    """1280 x 1280 at patch 16 (6400 tokens) with context-aware keep counts; shapes only."""
    m = XrayMAE(img_size=1280, patch_size=16, **TINY).eval()
    inside = masking.box_region((80, 80))[None]
    s = masking.context_aware_masking(inside, 0.95, 0.85)
    with torch.no_grad():
        out = m(torch.rand(1, 1, 1280, 1280), keep=s.keep)
    assert out["pred"].shape == (1, 6400, 256) and out["latent"].shape[1] == 1 + s.keep.shape[1]
    # the same weights run at another input size (position embeddings recomputed/interpolated)
    with torch.no_grad():
        assert m(torch.rand(1, 1, 256, 320))["pred"].shape == (1, 16 * 20, 256)
    ml = XrayMAE(img_size=128, patch_size=16, encoder_kwargs={"pos_embed": "learned"}, **TINY).eval()
    with torch.no_grad():
        assert ml(torch.rand(1, 1, 192, 192))["pred"].shape == (1, 144, 256)


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    a = XrayMAE(img_size=64, patch_size=16, **TINY)
    b = XrayMAE(img_size=64, patch_size=16, grad_checkpointing=True, **TINY)
    b.load_state_dict(a.state_dict())
    x = torch.rand(2, 1, 64, 64)
    s = masking.random_masking(2, 16, 0.5, torch.Generator().manual_seed(0))
    for m in (a, b):
        m.train()
        m(x, keep=s.keep)["pred"].square().mean().backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-6), n


def test_3d_encoder_rejected_and_encoder_roundtrip(tmp_path):
    with pytest.raises(FvlmError, match="2D encoder"):
        XrayMAE(encoder="vit3d_nano", img_size=64, patch_size=16)
    m = XrayMAE(img_size=64, patch_size=16, **TINY)
    save_encoder(tmp_path / "enc.pt", m, {"step": 3})
    enc, spec = load_encoder(tmp_path / "enc.pt")
    assert spec["name"] == "vit2d_nano"
    x = torch.rand(1, 1, 64, 64)
    m.eval()
    assert torch.allclose(enc.eval().forward_features(x), m.encoder.forward_features(x), atol=1e-6)
    # the shared loader reads it too (weights under image_encoder.)
    from fvlm.encoders import create_encoder, load_encoder_weights

    other = create_encoder("vit2d_nano", img_size=(128, 128), patch_size=(16, 16), in_chans=1)
    rep = load_encoder_weights(other, tmp_path / "enc.pt")
    assert not rep.missing and not rep.mismatched
    (tmp_path / "bad.pt").write_bytes(b"nope")
    with pytest.raises(FvlmError):
        load_encoder(tmp_path / "bad.pt")


def test_config_errors():
    with pytest.raises(ConfigError, match="divisible"):
        load_config(XrayPretrainConfig, sets=["data.size=100"])
    with pytest.raises(ConfigError, match="ratio_inside"):
        load_config(XrayPretrainConfig, sets=["mask.ratio_inside=1.0"])
    with pytest.raises(ConfigError, match="strategy"):
        load_config(XrayPretrainConfig, sets=["mask.strategy=contour"])
    cfg = load_config(XrayPretrainConfig, base="xray/mae_context_1280.yaml")
    assert cfg.data.size == 1280 and cfg.mask.strategy == "context" and cfg.model.grad_checkpointing
    assert build_xray_mae(load_config(XrayPretrainConfig).model).encoder.grid_size == (14, 14)


@pytest.fixture(scope="module")
def sample_cache(tmp_path_factory, cxr_samples):
    from fvlm.xray.data import build_cache

    p = tmp_path_factory.mktemp("xcache") / "cxr128.h5"
    build_cache(cxr_samples / "labels.csv", p, 128)
    return p


def test_registry_builds_and_rebuilds_the_mae():
    from fvlm.models import create_model, list_models

    assert "xray_mae" in list_models()
    cfg = load_config(XrayPretrainConfig, base="xray/tiny_cpu.yaml")
    m = create_model("xray_mae", cfg.model, img_size=cfg.data.size)
    assert isinstance(m, XrayMAE) and m.encoder_name == "vit2d_nano" and m.grid_size == (8, 8)
    again = create_model("xray_mae", m.config)   # the network's own config rebuilds it
    assert again.config == m.config
    again.load_state_dict(m.state_dict())
    assert create_model("xray_mae").grid_size == (14, 14)   # defaults: ViT-tiny at 224


def test_train_keys_are_the_shared_ones_and_earlier_spellings_map():
    from fvlm.config import describe
    from fvlm.engine.config import TrainConfig

    cfg = load_config(XrayPretrainConfig, sets=["train.min_lr=1.5e-5", "train.grad_clip=0.5", "train.resume=false",
                                                "train.deepspeed_config=null"])
    t = cfg.train
    assert isinstance(t, TrainConfig) and t.lr == pytest.approx(1.5e-4)
    assert t.min_lr_ratio == pytest.approx(0.1) and t.clip_grad == 0.5 and t.resume == "never"
    assert t.deepspeed_config == "deepspeed/zero0.json" and t.min_lr is None and t.grad_clip is None
    assert load_config(XrayPretrainConfig, sets=["train.resume=true"]).train.resume == "auto"
    for name in ("default", "tiny_cpu", "gmml_512", "mae_context_1280"):
        load_config(XrayPretrainConfig, base=f"xray/{name}.yaml")
    assert load_config(XrayPretrainConfig, base="xray/mae_context_1280.yaml").train.zero_stage == 1
    with pytest.raises(ConfigError, match="no validation"):
        load_config(XrayPretrainConfig, sets=["train.val_metric=val/auc_mean"])
    with pytest.raises(ConfigError, match="zero_stage"):
        load_config(XrayPretrainConfig, sets=["train.zero_stage=3"])
    rows = describe(XrayPretrainConfig)
    assert all(r[3] for r in rows), [r[0] for r in rows if not r[3]]   # every key documented
    keys = {r[0] for r in rows}
    assert {"train.vis_every", "train.batch_size", "train.min_lr_ratio", "train.keep_checkpoints",
            "train.stop_after", "data.cache", "probe.labels"} <= keys


def test_stream_is_deterministic_resumable_and_split_by_rank(sample_cache):
    from fvlm.xray.batch import XrayCollate, XrayStream
    from fvlm.xray.data import XrayDataset

    cfg = load_config(XrayPretrainConfig, base="xray/tiny_cpu.yaml")
    ds = XrayDataset(cache=sample_cache, size=128, flip=True)
    collate = XrayCollate(cfg.mask, 16)
    full = XrayStream(ds, collate, 4, seed=3)
    it = iter(full)
    ref = [next(it) for _ in range(5)]       # 20 draws of 14 images: crosses an epoch
    later = iter(XrayStream(ds, collate, 4, seed=3, start=3))
    for b in ref[3:]:
        got = next(later)
        assert torch.equal(got["index"], b["index"]) and torch.equal(got["keep"], b["keep"])
        assert torch.equal(got["image"], b["image"])
    first = [int(i) for b in ref[:4] for i in b["index"]][:14]
    assert sorted(first) == list(range(14))   # an epoch sees every image once
    r0, r1 = (XrayStream(ds, collate, 4, rank=r, world=2, seed=3).indices(0) for r in (0, 1))
    assert r0 == full.indices(0) and r1 == full.indices(1)   # ranks take consecutive blocks


def _metric_losses(out) -> dict[int, float]:
    with open(out / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


@pytest.mark.parametrize("method", ["mae", "gmml"])
def test_training_on_real_radiographs_loss_falls(tmp_path, sample_cache, method, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/work/.torch_extensions")
    from PIL import Image

    from fvlm.models.xray_mae import load_encoder
    from fvlm.xray.pretrain import run

    sets = [f"data.cache={sample_cache}", "data.size=128", "model.encoder=vit2d_nano", "model.decoder_dim=64",
            "model.decoder_depth=1", "model.decoder_heads=4", f"mask.method={method}", "mask.strategy=context",
            "mask.ratio_inside=0.9", "mask.ratio_outside=0.7", "train.steps=30", "train.batch_size=4",
            "train.lr=2e-3", "train.warmup_steps=3", "train.log_every=1", "train.vis_every=30",
            "train.ckpt_every=0", "train.tensorboard=false", f"train.out_dir={tmp_path}", "mask.gmml_fraction=0.4"]
    cfg = load_config(XrayPretrainConfig, sets=sets)
    res = run(cfg)
    losses = _metric_losses(tmp_path)
    assert res["steps"] == 30 and not res["interrupted"] and sorted(losses) == list(range(1, 31))
    first = sum(losses[s] for s in range(1, 5)) / 4
    last = sum(losses[s] for s in range(27, 31)) / 4
    print(method, "loss", [round(losses[s], 3) for s in sorted(losses)])
    assert last < 0.85 * first, (first, last)
    with Image.open(tmp_path / "vis" / "step000030.png") as im:   # 4 rows x 4 labelled columns, 128 px tiles
        assert 4 * 128 < im.size[0] < 4 * 256 and 4 * 128 < im.size[1] < 4 * 256  # native size, not blown up
    assert (tmp_path / "checkpoints" / "latest_complete").read_text() == "step_00000030"
    enc, spec = load_encoder(tmp_path / "encoder.pt")
    assert spec["name"] == "vit2d_nano"
    assert torch.load(tmp_path / "encoder.pt", weights_only=True)["meta"]["step"] == 30


def test_command_trains_resumes_exactly_and_probes(tmp_path, sample_cache, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/work/.torch_extensions")
    from fvlm.cli import main
    from fvlm.resources import samples_dir

    def args(out, *sets):
        a = ["pretrain-xray", "--config", "configs/xray/tiny_cpu.yaml", "--out", str(out), "--steps", "3",
             "--set", f"data.cache={sample_cache}", "--set", "train.vis_every=0", "--set", "train.log_every=1",
             "--set", "train.tensorboard=false", "--quiet"]
        for s in sets:
            a += ["--set", s]
        return a

    ref, out = tmp_path / "ref", tmp_path / "run"
    assert main(args(ref)) == 0
    assert main(args(out, "train.stop_after=2")) == 3            # stopped with a checkpoint
    assert (out / "checkpoints" / "latest_complete").read_text() == "step_00000002"
    assert main(args(out)) == 0                                   # resumes at step 2
    assert (out / "config.yaml").is_file() and "resumed from" in (out / "pretrain_xray.log").read_text()
    a, b = _metric_losses(ref), _metric_losses(out)
    assert sorted(b) == [1, 2, 3]
    for s in (1, 2, 3):
        assert abs(a[s] - b[s]) < 1e-5, (s, a[s], b[s])
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    assert json.loads((out / "deepspeed.json").read_text())["train_micro_batch_size_per_gpu"] == 4
    assert main(["pretrain-xray", "--config", "configs/xray/tiny_cpu.yaml", "--out", str(out), "--probe-only",
                 "--linear-probe", str(samples_dir() / "cxr" / "labels.csv"), "--set", "probe.folds=3",
                 "--set", "probe.min_positives=2", "--quiet"]) == 0
    probe = json.loads((out / "probe.json").read_text())
    assert probe["images"] == 14 and probe["feature_dim"] == 96 and "Emphysema" in probe["labels"]
    assert (out / "probe.md").read_text().startswith("# Linear probe")
    # the encoder written by `fvlm pretrain-xray` starts a 2D dense model (frozen: weights unchanged)
    from fvlm.models.dense import load_dense
    from fvlm.models.xray_mae import load_encoder

    assert main(["dense", "train", "--out", str(tmp_path / "dense"), "--pretrained", str(out / "encoder.pt"),
                 "--freeze-encoder", "--steps", "2", "--set", "model.encoder=vit2d_tiny", "--set", "model.img_size=[64,64]",
                 "--set", "model.patch_size=[8,8]", "--set", "data.classes=[liver]", "-q"]) == 0
    dense, info = load_dense(tmp_path / "dense" / "dense.pt")
    xenc, spec = load_encoder(out / "encoder.pt")
    assert info["model_config"].encoder == spec["name"] == "vit2d_nano"       # family/patch from the checkpoint
    assert list(info["model_config"].patch_size) == [16, 16] and info["model_config"].input_norm
    xsd = xenc.state_dict()
    for k, v in dense.encoder.state_dict().items():
        if k != "pos_embed":   # resized to the 64 px grid
            torch.testing.assert_close(v, xsd[k], msg=k)
    # bad input is one line, exit code 2
    capsys.readouterr()
    assert main(["pretrain-xray", "--data", str(tmp_path / "nowhere"), "--out", str(out), "--quiet"]) == 2
    assert "data source not found" in capsys.readouterr().err
    old = tmp_path / "old"
    (old / "checkpoints").mkdir(parents=True)
    (old / "checkpoints" / "latest").write_text("step5")
    assert main(args(old)) == 2
    assert "earlier X-ray loop" in capsys.readouterr().err


def test_config_show_documents_pretrain_xray(capsys):
    from fvlm.cli import main

    assert main(["config", "show", "pretrain-xray", "--config", "configs/xray/gmml_512.yaml"]) == 0
    text = capsys.readouterr().out
    for key in ("train.vis_every", "train.min_lr_ratio", "train.clip_grad", "train.deepspeed_config",
                "mask.gmml_corruption", "data.cache"):
        assert key in text
