"""The encoder contract, tested for every registered encoder (a new one is tested for free)."""
import math

import pytest
import torch

from fvlm.encoders import (create_encoder, inflate_patch_kernel, list_encoders, load_encoder_weights, patchify,
                           unpatchify)
from fvlm.errors import FvlmError

# Small inputs keep the large sizes affordable on CPU: shapes are what is tested here.
SMALL = {2: dict(img_size=(32, 48), patch_size=(16, 16)),
         3: dict(img_size=(32, 32, 16), patch_size=(16, 16, 8))}


def _make(name, **kw):
    dims = 2 if name.startswith("vit2d") else 3
    return create_encoder(name, **{**SMALL[dims], **kw}), dims


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("name", list_encoders())
def test_contract_shapes(name):
    enc, dims = _make(name)
    enc.eval()
    x = torch.randn(2, 1, *SMALL[dims]["img_size"])
    grid = tuple(s // p for s, p in zip(SMALL[dims]["img_size"], SMALL[dims]["patch_size"]))
    assert enc.grid_size == grid and enc.num_patches == math.prod(grid) and enc.spatial_dims == dims
    with torch.no_grad():
        tok = enc.forward_features(x)
        assert tok.shape == (2, enc.num_prefix_tokens + enc.num_patches, enc.embed_dim)
        maps = enc.forward_intermediates(x, indices=(0, -1))
        assert len(maps) == 2 and all(m.shape == (2, enc.embed_dim, *grid) for m in maps)
        d = enc.dense(x)
        assert d.shape == (2, enc.embed_dim, *grid)
        # the last intermediate (normed) is the dense map
        torch.testing.assert_close(maps[-1], d)


@pytest.mark.parametrize("name", list_encoders())
def test_keep_masking_selects_tokens(name):
    enc, dims = _make(name)
    enc.eval()
    x = torch.randn(2, 1, *SMALL[dims]["img_size"])
    keep = torch.stack([torch.randperm(enc.num_patches)[:3] for _ in range(2)])
    with torch.no_grad():
        out = enc.forward_features(x, keep=keep)
    assert out.shape == (2, enc.num_prefix_tokens + 3, enc.embed_dim)
    # keeping every token in order equals no masking
    full = torch.arange(enc.num_patches).expand(2, -1)
    with torch.no_grad():
        torch.testing.assert_close(enc.forward_features(x, keep=full), enc.forward_features(x))


@pytest.mark.parametrize("name", [n for n in list_encoders() if n.endswith(("nano", "tiny"))])
def test_grad_checkpointing_same_outputs_and_grads(name):
    enc, dims = _make(name)
    enc.train()
    x = torch.randn(2, 1, *SMALL[dims]["img_size"])
    out1 = enc.forward_features(x).pow(2).mean()
    out1.backward()
    g1 = {k: p.grad.clone() for k, p in enc.named_parameters() if p.grad is not None}
    enc.zero_grad()
    enc.set_grad_checkpointing(True)
    out2 = enc.forward_features(x).pow(2).mean()
    out2.backward()
    g2 = {k: p.grad.clone() for k, p in enc.named_parameters() if p.grad is not None}
    torch.testing.assert_close(out1, out2)
    assert g1.keys() == g2.keys() and len(g1) > 0
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("pos", ["sincos", "learned"])
@pytest.mark.parametrize("dims", [2, 3])
def test_position_embedding_interpolates_to_new_grid(pos, dims):
    name = f"vit{dims}d_nano"
    enc, _ = _make(name, pos_embed=pos)
    enc.eval()
    big = tuple(s * 2 for s in SMALL[dims]["img_size"])
    x = torch.randn(1, 1, *big)
    with torch.no_grad():
        d = enc.dense(x)
    assert d.shape[2:] == tuple(2 * g for g in enc.grid_size)
    pe = enc.pos_embed_for(tuple(2 * g for g in enc.grid_size))
    assert pe.shape == (1, enc.num_patches * 2 ** dims, enc.embed_dim)
    if pos == "learned":  # interpolation of a constant field stays constant
        with torch.no_grad():
            enc.pos_embed.fill_(0.5)
        torch.testing.assert_close(enc.pos_embed_for((4, 6) if dims == 2 else (4, 4, 4)),
                                   torch.full_like(enc.pos_embed_for((4, 6) if dims == 2 else (4, 4, 4)), 0.5))


def test_sdpa_matches_plain_attention():
    a = create_encoder("vit3d_nano", **SMALL[3])
    b = create_encoder("vit3d_nano", **SMALL[3], attn_impl="math")
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    x = torch.randn(2, 1, *SMALL[3]["img_size"])
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-4)


def test_patchify_roundtrip_2d_3d():
    x = torch.randn(2, 3, 16, 24)
    assert torch.equal(unpatchify(patchify(x, (8, 8)), (8, 8), (2, 3), 3), x)
    v = torch.randn(1, 1, 8, 12, 4)
    p = patchify(v, (4, 4, 2))
    assert p.shape == (1, 2 * 3 * 2, 32)
    assert torch.equal(unpatchify(p, (4, 4, 2), (2, 3, 2), 1), v)
    # patch k holds exactly the voxels of grid cell k (raster order)
    assert torch.equal(p[0, 1], v[0, 0, 0:4, 0:4, 2:4].reshape(-1))


def test_load_weights_reports_mismatches(tmp_path):
    src = create_encoder("vit3d_nano", **SMALL[3])
    sd = {"model": {"module." + k: v for k, v in src.state_dict().items()}}
    sd["model"]["module.extra_head.weight"] = torch.zeros(3)
    del sd["model"]["module.norm.bias"]
    sd["model"]["module.blocks.0.mlp.fc1.weight"] = torch.zeros(5, 5)
    path = tmp_path / "w.pt"
    torch.save(sd, path)
    dst = create_encoder("vit3d_nano", **SMALL[3])
    rep = load_encoder_weights(dst, path)
    assert "extra_head.weight" in rep.unexpected
    assert "norm.bias" in rep.missing
    assert any(m.startswith("blocks.0.mlp.fc1.weight") for m in rep.mismatched)
    torch.testing.assert_close(dst.blocks[1].attn.qkv.weight, src.blocks[1].attn.qkv.weight)
    with pytest.raises(FvlmError, match="do not match"):
        load_encoder_weights(create_encoder("vit3d_nano", **SMALL[3]), path, strict=True)
    with pytest.raises(FvlmError, match="not found"):
        load_encoder_weights(dst, tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(FvlmError, match="cannot read"):
        load_encoder_weights(dst, tmp_path / "bad.pt")


def test_inflate_2d_checkpoint_into_3d():
    """An RGB 2D ViT (MAE ImageNet layout, learned pos-embed with cls) initialises the 3D encoder."""
    src = create_encoder("vit2d_nano", img_size=(64, 64), patch_size=(16, 16), in_chans=3, pos_embed="learned")
    sd = src.state_dict()
    sd["pos_embed"] = torch.cat([torch.zeros(1, 1, 96), sd["pos_embed"]], 1)  # MAE stores cls first
    dst = create_encoder("vit3d_nano", img_size=(32, 32, 16), patch_size=(16, 16, 8), pos_embed="learned")
    rep = load_encoder_weights(dst, sd)
    assert rep.inflated == ["patch_embed.proj.weight"] and "pos_embed" in rep.resized
    assert not rep.missing and not rep.mismatched
    torch.testing.assert_close(dst.blocks[2].mlp.fc2.weight, src.blocks[2].mlp.fc2.weight)
    # a volume constant along z responds like the gray 2D image fed to all RGB channels
    img = torch.randn(1, 1, 16, 16)
    vol = img.unsqueeze(-1).repeat(1, 1, 1, 1, 8)
    with torch.no_grad():
        r2 = torch.nn.functional.conv2d(img.repeat(1, 3, 1, 1), src.patch_embed.proj.weight)
        r3 = torch.nn.functional.conv3d(vol, dst.patch_embed.proj.weight)
    torch.testing.assert_close(r3[..., 0], r2, atol=1e-5, rtol=1e-4)


def test_inflate_kernel_resizes_in_plane():
    w = torch.randn(4, 3, 16, 16)
    out = inflate_patch_kernel(w, (8, 8, 4), 1)
    assert out.shape == (4, 1, 8, 8, 4)
    torch.testing.assert_close(out.sum(dim=(1, 2, 3, 4)), w.sum(dim=(1, 2, 3)), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kw,msg", [
    (dict(img_size=(30, 32, 16)), "not divisible"),
    (dict(pos_embed="rope"), "pos_embed"),
    (dict(embed_dim=100, num_heads=3), "divisible by num_heads"),
    (dict(img_size=(32, 32)), "3 values"),
])
def test_bad_encoder_arguments(kw, msg):
    with pytest.raises(FvlmError, match=msg):
        create_encoder("vit3d_nano", **{**SMALL[3], **kw})


def test_unknown_encoder_suggests():
    with pytest.raises(FvlmError, match="did you mean 'vit3d_tiny'"):
        create_encoder("vit3d_tiyn")


def test_bad_inputs_give_clear_errors():
    enc, _ = _make("vit3d_nano")
    with pytest.raises(ValueError, match="not divisible"):
        enc(torch.randn(1, 1, 30, 32, 16))
    with pytest.raises(ValueError, match="spatial dims"):
        enc(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="channel"):
        enc(torch.randn(1, 2, 32, 32, 16))


def test_text_encoder_local_minilm():
    from fvlm.encoders import TextEncoder

    te = TextEncoder()
    e = te.encode(["No pleural effusion.", "There is no pleural effusion.", "The liver is enlarged."])
    assert e.shape == (3, 384)
    cos = torch.nn.functional.normalize(e, dim=-1) @ torch.nn.functional.normalize(e, dim=-1).T
    # a real pretrained model: paraphrases are closer than unrelated sentences
    assert cos[0, 1] > cos[0, 2] + 0.2
    assert te.identity["name"].endswith("all-MiniLM-L6-v2")


def test_text_encoder_missing_dir_message(tmp_path):
    from fvlm.encoders import TextEncoder

    with pytest.raises(FvlmError, match="no config.json.*local copy"):
        TextEncoder(model_dir=tmp_path)


def test_tiny_random_text_encoder_trains():
    from fvlm.encoders import TextEncoder

    te = TextEncoder.tiny_random()
    tok = te.tokenize(["no effusion", "fatty liver"])
    out = te(**tok)
    out.sum().backward()
    assert out.shape == (2, te.embed_dim)
    assert any(p.grad is not None for p in te.parameters())


@pytest.mark.parametrize("pos", ["sincos", "learned"])
@pytest.mark.parametrize("name", ["vit2d_nano", "vit3d_nano"])
def test_no_weight_decay_names_tokens_norms_and_biases(name, pos):
    enc, _ = _make(name, pos_embed=pos, stem="conv" if name.startswith("vit3d") else "linear")
    nwd = enc.no_weight_decay()
    params = dict(enc.named_parameters())
    assert nwd <= params.keys()
    assert "cls_token" in nwd and "norm.weight" in nwd and "norm.bias" in nwd
    assert ("pos_embed" in nwd) == (pos == "learned")      # the sin-cos table is a buffer, not a parameter
    assert "blocks.0.norm1.weight" in nwd and "blocks.0.attn.qkv.bias" in nwd and "patch_embed.proj.bias" in nwd
    # every matrix/kernel weight is decayed: only tokens and 1-d parameters are exempt
    decayed = params.keys() - nwd
    assert {"blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight", "patch_embed.proj.weight"} <= decayed
    assert all(params[n].ndim >= 2 for n in decayed)
    if name.startswith("vit3d"):
        assert "patch_embed.stem.1.weight" in nwd and "patch_embed.stem.0.weight" in decayed  # instance norm gain


def test_text_encoder_no_weight_decay():
    from fvlm.encoders import TextEncoder

    te = TextEncoder.tiny_random()
    nwd = te.no_weight_decay()
    params = dict(te.named_parameters())
    assert any(n.endswith("LayerNorm.weight") for n in nwd) and any(n.endswith(".bias") for n in nwd)
    assert not any(n.endswith("query.weight") for n in nwd)
    assert all(params[n].ndim == 1 for n in nwd)
