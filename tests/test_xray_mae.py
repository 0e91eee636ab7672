"""X-ray MAE network on the shared encoder, the DeepSpeed loop on real radiographs, the command."""
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


@pytest.mark.parametrize("method", ["mae", "gmml"])
def test_training_on_real_radiographs_loss_falls(tmp_path, sample_cache, method, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/work/.torch_extensions")
    from fvlm.xray.batch import XrayCollate, XrayPretrainTask
    from fvlm.xray.data import XrayDataset
    from fvlm.xray.engine import fit

    sets = [f"data.cache={sample_cache}", "data.size=128", "model.encoder=vit2d_nano", "model.decoder_dim=64",
            "model.decoder_depth=1", "model.decoder_heads=4", f"mask.method={method}", "mask.strategy=context",
            "mask.ratio_inside=0.9", "mask.ratio_outside=0.7", "train.steps=30", "train.batch_size=4",
            "train.lr=2e-3", "train.warmup_steps=3", "train.log_every=10", "train.vis_every=30",
            "train.ckpt_every=0", f"train.out_dir={tmp_path}", "mask.gmml_fraction=0.4"]
    cfg = load_config(XrayPretrainConfig, sets=sets)
    torch.manual_seed(0)
    ds = XrayDataset(cache=sample_cache, size=128)
    task = XrayPretrainTask(build_xray_mae(cfg.model, 128), cfg.mask)
    res = fit(task, ds, XrayCollate(cfg.mask, 16), cfg)
    losses = res["losses"]
    assert res["steps"] == 30
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    print(method, "loss", [round(x, 3) for x in losses])
    assert last < 0.85 * first, (first, last)
    assert (tmp_path / "vis" / "step000030.png").is_file()
    assert (tmp_path / "encoder.pt").is_file() and (tmp_path / "checkpoints" / "latest").is_file()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 1 and lines[-1]["step"] == 30


def test_command_trains_resumes_and_probes(tmp_path, sample_cache, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/work/.torch_extensions")
    from fvlm.cli import main
    from fvlm.resources import samples_dir

    out = tmp_path / "run"
    args = ["pretrain-xray", "--config", "configs/xray/tiny_cpu.yaml", "--out", str(out), "--steps", "2",
            "--set", f"data.cache={sample_cache}", "--set", "train.vis_every=0", "--quiet"]
    assert main(args) == 0
    assert (out / "config.yaml").is_file() and (out / "pretrain_xray.log").is_file()
    # resume continues from the checkpoint rather than starting over
    assert main(args[:6] + ["3"] + args[7:]) == 0
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 3 and steps.count(1) == 1
    assert main(["pretrain-xray", "--config", "configs/xray/tiny_cpu.yaml", "--out", str(out), "--probe-only",
                 "--linear-probe", str(samples_dir() / "cxr" / "labels.csv"), "--set", "probe.folds=3",
                 "--set", "probe.min_positives=2", "--quiet"]) == 0
    probe = json.loads((out / "probe.json").read_text())
    assert probe["images"] == 14 and probe["feature_dim"] == 96 and "Emphysema" in probe["labels"]
    assert (out / "probe.md").read_text().startswith("# Linear probe")
    # bad input is one line, exit code 2
    assert main(["pretrain-xray", "--data", str(tmp_path / "nowhere"), "--out", str(out), "--quiet"]) == 2
    assert "data source not found" in capsys.readouterr().err
