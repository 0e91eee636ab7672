"""Named model sizes are what they say, for every shipped model and pretraining config.

`fvlm pretrain` merges train/default.yaml (based on model/fvlm_tiny.yaml) before every --config,
and mappings deep-merge: a key a model config leaves out is inherited from the tiny model. That
once built a 4-block "ViT-B" (34.6M parameters instead of 91M) from vitb3d_gpu.yaml.
"""
import dataclasses
from pathlib import Path

import pytest
import torch

from fvlm.config import build, load_config, read_yaml, to_dict
from fvlm.encoders import SIZES, TextEncoder, create_encoder
from fvlm.errors import ConfigError
from fvlm.models import create_model
from fvlm.resources import configs_dir
from fvlm.ct.config import PretrainConfig

ANATS = ["lung", "heart", "liver", "kidney"]
M = 1e6
# config -> (encoder depth, width, encoder parameters in [lo, hi]); a new config must be added here
EXPECTED = {
    "model/fvlm_tiny.yaml": (4, 96, 0.3 * M, 1 * M),      # vit3d_nano
    "model/clip_tiny.yaml": (4, 96, 0.3 * M, 1 * M),
    "model/fvlm_vitb.yaml": (12, 768, 85 * M, 95 * M),    # ViT-B/3D: 85M blocks + 6.3M patch kernel
    "train/default.yaml": (4, 96, 0.3 * M, 1 * M),
    "train/tiny.yaml": (2, 48, 0.02 * M, 0.2 * M),        # shrunk on purpose, for CPU tests
    "train/vitb3d_gpu.yaml": (12, 768, 85 * M, 95 * M),
    "train/vitb3d_crop_gpu.yaml": (12, 768, 84 * M, 95 * M),  # same tower, 54 position embeddings, not 1232
}


def _shipped(sub):
    return sorted(f"{sub}/{p.name}" for p in (configs_dir() / sub).glob("*.yaml"))


def _resolved(name):
    """The config `fvlm pretrain --config NAME` runs with."""
    return load_config(PretrainConfig, files=[name], base="train/default.yaml")


def _build(cfg: PretrainConfig, meta: bool):
    mc = dataclasses.replace(cfg.model, anatomies=cfg.model.anatomies or ANATS)
    text = TextEncoder.tiny_random()      # the text side is not what is sized here
    if meta:                              # ViT-B's 91M parameters: count them without allocating
        with torch.device("meta"):
            return create_model(cfg.model_name, mc, text_encoder=text)
    return create_model(cfg.model_name, mc, text_encoder=text)


def test_every_shipped_config_has_an_expected_size():
    assert set(_shipped("model") + _shipped("train")) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_encoder_size_matches_name(name):
    depth, width, lo, hi = EXPECTED[name]
    cfg = _resolved(name)
    model = _build(cfg, meta=width >= 768)
    enc = model.image_encoder
    n = sum(p.numel() for p in enc.parameters())
    assert (enc.depth, enc.embed_dim, len(enc.blocks)) == (depth, width, depth), name
    assert lo <= n <= hi, f"{name}: {n / M:.1f}M encoder parameters"
    size = cfg.model.image.encoder.split("_", 1)[1]
    if not cfg.model.image.encoder_args:   # no per-run override: the registry size is the size
        assert (enc.depth, enc.embed_dim) == (SIZES[size]["depth"], SIZES[size]["embed_dim"])
    # the levels the config asks for are the encoder blocks pooled (no wrapping)
    d = enc.depth
    assert model.levels == sorted({i % d for i in cfg.model.image.levels})
    assert all(-d <= i < d for i in cfg.model.image.levels)


def test_vitb_parameter_count_exact():
    """ViT-B/3D, 12 blocks of width 768 (7.08M each), a 32x16x16 patch kernel and the final norm."""
    model = _build(_resolved("train/vitb3d_gpu.yaml"), meta=True)
    n = sum(p.numel() for p in model.image_encoder.parameters())
    block = 768 * 3 * 768 + 3 * 768 + 768 * 768 + 768 + 2 * 768 * 3072 + 3072 + 768 + 4 * 768
    assert n == 12 * block + (32 * 16 * 16 * 768 + 768) + 768 + 2 * 768   # + cls token + final norm
    assert 91.0 * M < n < 91.5 * M
    assert model.levels == [2, 5, 8, 11]


@pytest.mark.parametrize("name", _shipped("model"))
def test_model_config_does_not_inherit_from_the_default_model(name):
    """A model config alone (over the schema defaults) and after train/default.yaml build the same model."""
    alone = build(PretrainConfig, read_yaml(configs_dir() / name))
    composed = _resolved(name)
    assert to_dict(composed.model) == to_dict(alone.model)
    assert composed.model_name == alone.model_name


@pytest.mark.parametrize("name", [n for n in sorted(EXPECTED) if EXPECTED[n][1] < 768])
def test_small_configs_build_and_run(name):
    cfg = _resolved(name)
    model = _build(cfg, meta=False).eval()
    x = torch.randn(1, 1, *cfg.model.image.img_size)
    with torch.no_grad():
        levels, grid = model._encode_levels(x)
    assert len(levels) == len(model.levels) and levels[0].shape[-1] == model.image_encoder.embed_dim


def test_levels_beyond_the_encoder_are_a_config_error():
    cfg = load_config(PretrainConfig, files=["train/tiny.yaml"], base="train/default.yaml",
                      sets=["model.image.levels=[2, 5, 8, 11]"])
    with pytest.raises(ConfigError, match=r"levels \[2, 5, 8, 11\].*\[2, 5, 8, 11\].*vit3d_nano of depth 2"):
        _build(cfg, meta=False)
    cfg.model.image.levels = [-3]
    with pytest.raises(ConfigError, match=r"\[-3\].*depth 2"):
        _build(cfg, meta=False)
    cfg.model.image.levels = []
    with pytest.raises(ConfigError, match="empty"):
        _build(cfg, meta=False)
    cfg.model.image.levels = [0, -1]    # negative from the end is fine
    assert _build(cfg, meta=False).levels == [0, 1]


def test_levels_error_is_one_line_exit_2(tmp_path, capsys):
    from fvlm.cli import main

    rc = main(["pretrain", "--config", "train/tiny.yaml", "--set", "model.image.levels=[7]",
               "--set", "train.steps=1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "levels [7]" in err and "depth 2" in err
