"""Collectives in a training step, with two real gloo processes.

- Frozen text under ZeRO-3: every text-encoder forward gathers partitioned weights, so all ranks
  must run the same number of forwards although their batches miss the cache differently.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fvlm.models.fvlm as fvlm_mod
from fvlm.models import create_model

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
