"""Collectives in a training step, with two real gloo processes.

- Frozen text under ZeRO-3: every text-encoder forward gathers partitioned weights, so all ranks
  must run the same number of forwards although their batches miss the cache differently.
- The contrastive loss: one all-gather per step whatever the number of anatomies (it was four
  per name plus three, ~67 with 16 anatomies), the same loss and gradients as before, and no
  host sync.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import torch.nn.functional as F

import fvlm.models.fvlm as fvlm_mod
from fvlm.losses import FineGrainedContrastiveLoss, LossConfig
from fvlm.models import create_model
from loss_reference import per_name_loss

ANATS = ["lung", "heart"]
# per rank, per step: the texts its batch brings (rank 0 misses much more at first, rank 1 later)
TEXTS = {0: [[f"nodule of {i} mm in the left lobe" for i in range(10)], [], ["nodule of 3 mm in the left lobe"]],
         1: [["normal lung"], [f"cyst of {i} cm" for i in range(2)], []]}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _text_model():
    torch.manual_seed(0)
    cfg = {"mode": "volume", "anatomies": ANATS, "embed_dim": 8,
           "image": {"encoder": "vit3d_nano", "img_size": [16, 16, 8], "patch_size": [8, 8, 4], "levels": [0],
                     "encoder_args": {"depth": 1, "embed_dim": 16, "num_heads": 2}},
           "text": {"model_dir": "tiny-random", "encode_group": 4}}
    return create_model("fvlm", cfg)


def _run_text_steps(rank, model):
    calls, feats = [], []
    orig = model._text_forward
    model._text_forward = lambda texts, **kw: calls.append(len(texts)) or orig(texts, **kw)
    per_step = []
    for texts in TEXTS[rank]:
        n0 = len(calls)
        feats.append(model._raw_text(texts))
        per_step.append(len(calls) - n0)
    return per_step, feats


def _text_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    fvlm_mod._is_partitioned = lambda module: True      # what ZeRO-3 partitioning looks like to the model
    per_step, feats = _run_text_steps(rank, _text_model())
    torch.save({"per_step": per_step, "feats": feats}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_zero3_text_forwards_are_the_same_on_every_rank(tmp_path):
    out = str(tmp_path / "text")
    mp.spawn(_text_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    r0, r1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    # groups of 4: rank 0 needs 3, 0, 0 forwards; rank 1 1, 1, 0; both run the maximum
    assert r0["per_step"] == r1["per_step"] == [3, 1, 0]
    for rank, r in ((0, r0), (1, r1)):       # the padding forwards change nothing: same bits as alone
        local_steps, local = _run_text_steps(rank, _text_model())
        assert local_steps == ([3, 0, 0] if rank == 0 else [1, 1, 0])
        for a, b in zip(r["feats"], local):
            assert torch.equal(a, b)


def test_text_groups_in_step_without_a_process_group():
    assert fvlm_mod.text_groups_in_step(0, 4, sync=True) == 0
    assert fvlm_mod.text_groups_in_step(9, 4, sync=True) == 3
    assert fvlm_mod.text_groups_in_step(8, 4, sync=False) == 2


def test_real_zero3_text_cache_does_not_hang(tmp_path):
    """DeepSpeed ZeRO-3, 2 gloo ranks, different cache misses per rank (hung before: #16)."""
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    out = str(tmp_path / "z3")
    worker = Path(__file__).with_name("zero3_text_worker.py")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(_free_port()), str(worker), out], env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    r0, r1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    assert r0["partitioned"] and r1["partitioned"]
    assert r0["per_step"] == r1["per_step"] == [3, 1, 0]
    for rank, r in ((0, r0), (1, r1)):       # the gathered weights give the single-process features
        _, local = _run_text_steps(rank, _text_model())
        for a, b in zip(r["feats"], local):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------- the loss

COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter", "reduce", "barrier")
B_GLOBAL = 8


def _loss_case(n_anat: int, sl: slice):
    """A batch of ``B_GLOBAL`` rows (rank slice ``sl``), ``n_anat`` anatomies + global, leaf embeddings."""
    g = torch.Generator().manual_seed(n_anat)
    anats = [f"an{i}" for i in range(n_anat)]
    names = anats + ["global"]
    img = {n: F.normalize(torch.randn(B_GLOBAL, 6, generator=g), dim=-1)[sl].requires_grad_(True) for n in names}
    txt = {n: F.normalize(torch.randn(B_GLOBAL, 6, generator=g), dim=-1)[sl].requires_grad_(True) for n in names}
    valid = {n: (torch.rand(B_GLOBAL, generator=g) > 0.25)[sl] for n in names}
    ref = {n: torch.randn(B_GLOBAL, 4, generator=g)[sl] for n in names}
    batch = {"status": torch.randint(0, 3, (B_GLOBAL, n_anat), generator=g)[sl],
             "global_status": torch.randint(0, 3, (B_GLOBAL,), generator=g)[sl],
             "labels": torch.randint(-1, 2, (B_GLOBAL, 3), generator=g).float()[sl]}
    out = {"image": img, "text": txt, "valid": valid, "text_ref": ref, "logit_scale": torch.tensor(6.0)}
    cfg = LossConfig(calibration=["normal", "disease", "text"], anatomy_weighting="count", global_weight=0.5,
                     calibration_options={"text": {"threshold": 0.5}})
    loss = FineGrainedContrastiveLoss(cfg, anats, {anats[0]: [0, 1], "global": [0, 1, 2]})
    return loss, out, batch


def _loss_and_grads(fn, n_anat, sl):
    loss, out, batch = _loss_case(n_anat, sl)
    total, _ = (loss if fn == "new" else (lambda o, b: per_name_loss(loss, o, b)))(out, batch)
    total.backward()
    grads = torch.cat([out[k][n].grad.flatten() for k in ("image", "text") for n in out[k]])
    return total.detach(), grads


def _loss_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    counts = {}

    def counting(name, fn):
        def wrapper(*a, **kw):
            counts[name] = counts.get(name, 0) + 1
            return fn(*a, **kw)
        return wrapper

    for name in COLLECTIVES:
        setattr(dist, name, counting(name, getattr(dist, name)))
    per = B_GLOBAL // world
    res = {}
    for n_anat in (3, 16):
        for fn in ("new", "old"):
            counts.clear()
            total, grads = _loss_and_grads(fn, n_anat, slice(rank * per, (rank + 1) * per))
            res[(fn, n_anat)] = {"loss": total, "grads": grads, "collectives": sum(counts.values())}
    torch.save(res, f"{out}.{rank}")
    dist.destroy_process_group()


def test_loss_gathers_once_per_step_and_matches_the_per_name_loss(tmp_path):
    out = str(tmp_path / "loss")
    mp.spawn(_loss_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}") for r in (0, 1)]
    for n_anat in (3, 16):
        ref_loss, ref_grads = _loss_and_grads("new", n_anat, slice(0, B_GLOBAL))      # one process
        old_loss, old_grads = _loss_and_grads("old", n_anat, slice(0, B_GLOBAL))
        assert torch.allclose(ref_loss, old_loss, atol=1e-6)
        assert torch.allclose(ref_grads, old_grads, atol=1e-6)
        ref_rows = ref_grads.view(-1, B_GLOBAL, 6)                     # (2 * names, rows, E)
        per = B_GLOBAL // 2
        for rank, r in enumerate(ranks):
            assert torch.allclose(r[("new", n_anat)]["loss"], ref_loss, atol=1e-6)
            assert torch.allclose(r[("old", n_anat)]["loss"], ref_loss, atol=1e-6)
            assert r[("new", n_anat)]["collectives"] == 1
            assert r[("old", n_anat)]["collectives"] == 4 * (n_anat + 1) + 3
            # a rank's own rows get world_size x the one-process gradient (the engine averages)
            mine = ref_rows[:, rank * per:(rank + 1) * per].reshape(-1) * 2
            assert torch.allclose(r[("new", n_anat)]["grads"], mine, atol=1e-6)
            assert torch.allclose(r[("old", n_anat)]["grads"], mine, atol=1e-6)


def test_loss_never_waits_for_the_host(monkeypatch):
    """No .item() / bool / int / float / tolist / nonzero on a tensor inside the loss (each a device sync)."""
    loss, out, batch = _loss_case(4, slice(0, B_GLOBAL))

    def sync(*a, **kw):
        raise AssertionError("host sync in the loss")

    for name in ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "nonzero", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    total, logs = loss(out, batch)
    total.backward()
    monkeypatch.undo()
    assert torch.isfinite(total) and all(torch.isfinite(v).all() for v in logs.values())
