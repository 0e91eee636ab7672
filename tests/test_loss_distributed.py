"""Two gloo processes give the same loss and gradients as one process over the concatenated batch."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from fvlm.losses import FineGrainedContrastiveLoss, LossConfig

N, D, E = 8, 6, 4   # global batch, input dim, embedding dim


def _data():
    g = torch.Generator().manual_seed(0)
    x_img, x_txt = torch.randn(N, D, generator=g), torch.randn(N, D, generator=g)
    status = torch.randint(0, 3, (N, 2), generator=g)
    labels = torch.randint(-1, 2, (N, 3), generator=g).float()
    valid = {"a": torch.ones(N, dtype=torch.bool), "b": torch.rand(N, generator=g) > 0.3,
             "global": torch.ones(N, dtype=torch.bool)}
    return x_img, x_txt, status, labels, valid


def _model():
    torch.manual_seed(1)
    return nn.ModuleDict({k: nn.Linear(D, E) for k in ("img_a", "img_b", "img_g", "txt")})


def _step(model, sl):
    x_img, x_txt, status, labels, valid = _data()
    cfg = LossConfig(calibration=["normal", "disease", "text"], global_weight=0.5,
                     calibration_options={"text": {"threshold": 0.5}, "disease": {"partial": 0.5}})
    loss_fn = FineGrainedContrastiveLoss(cfg, ["a", "b"], {"a": [0, 1], "b": [2]})
    img = {"a": F.normalize(model["img_a"](x_img[sl]), dim=-1), "b": F.normalize(model["img_b"](x_img[sl]), dim=-1),
           "global": F.normalize(model["img_g"](x_img[sl]), dim=-1)}
    t = F.normalize(model["txt"](x_txt[sl]), dim=-1)
    txt = {"a": t, "b": t.flip(-1), "global": t.roll(1, -1)}
    out = {"image": img, "text": txt, "valid": {k: v[sl] for k, v in valid.items()},
           "logit_scale": torch.tensor(5.0), "text_ref": {"a": x_txt[sl], "b": x_txt[sl]}}
    loss, logs = loss_fn(out, {"status": status[sl], "labels": labels[sl], "global_status": status[sl, 0]})
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


def _worker(rank, world, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = _model()
    per = N // world
    loss, grads = _step(model, slice(rank * per, (rank + 1) * per))
    for g in grads.values():           # what the data-parallel engine does: average gradients
        dist.all_reduce(g)
        g /= world
    if rank == 0:
        torch.save({"loss": loss, "grads": grads}, out_path)
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    ref_loss, ref_grads = _step(_model(), slice(0, N))
    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    got = torch.load(out)
    assert torch.allclose(got["loss"], ref_loss, atol=1e-6)
    for k, g in ref_grads.items():
        assert torch.allclose(got["grads"][k], g, atol=1e-6), k
