"""The X-ray pretraining loop on DeepSpeed, kept small so it can be swapped for the shared engine.

``fit(task, dataset, collate, cfg)`` runs ``deepspeed.initialize`` on the task module
(model + loss), an AdamW optimizer and a warm-up + cosine schedule, and writes into
``cfg.train.out_dir``: ``metrics.jsonl`` (one line per logged step), PNG grids under
``vis/``, DeepSpeed checkpoints under ``checkpoints/`` (resumed from when present) and the
encoder alone as ``encoder.pt`` (``fvlm-xray-encoder``) at every checkpoint.

It only assumes ``task(batch) -> {"loss", "pred"}``; nothing here is X-ray specific
except the PNG grids.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import torch

log = logging.getLogger("fvlm.xray.engine")

__all__ = ["deepspeed_config", "lr_lambda", "fit"]


def deepspeed_config(train_cfg, base: dict | None = None) -> dict:
    """The DeepSpeed JSON for a train config (``base`` = a JSON file's content to start from)."""
    ds = dict(base or {})
    ds.update({
        "train_micro_batch_size_per_gpu": train_cfg.batch_size,
        "gradient_accumulation_steps": train_cfg.grad_accum,
        "gradient_clipping": float(train_cfg.grad_clip),
        "steps_per_print": 10 ** 9,  # our own logging
        "wall_clock_breakdown": False,
        "zero_optimization": {**ds.get("zero_optimization", {}), "stage": int(train_cfg.zero_stage)},
    })
    ds.pop("optimizer", None)  # ours is passed in (a torch AdamW works on CPU and GPU alike)
    ds.pop("scheduler", None)
    ds.pop("bf16", None)
    ds.pop("fp16", None)
    if train_cfg.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif train_cfg.precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return ds


def lr_lambda(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate: linear warm-up, then cosine down to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    prog = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * prog))


def _init_dist_env() -> None:
    # single-process runs (tests, a workstation) need no launcher
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def _to(batch: dict, device, dtype) -> dict:
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(device, non_blocking=True)
            if v.is_floating_point() and dtype is not None:
                v = v.to(dtype)
        out[k] = v
    return out


def fit(task: torch.nn.Module, dataset, collate, cfg, on_step=None) -> dict:
    """Train ``task`` on ``dataset`` with DeepSpeed; returns ``{"steps", "losses", "out_dir"}``.

    ``cfg`` is an :class:`~fvlm.xray.config.XrayPretrainConfig`; ``on_step(step, loss)``
    is an optional callback (tests use it to stop early).
    """
    import deepspeed

    from ..errors import FvlmError
    from ..models.xray_mae import save_encoder
    from .visualize import reconstruction_images, save_grid

    t = cfg.train
    out = Path(t.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(t.seed)
    _init_dist_env()
    base = None
    if t.deepspeed_config:
        from ..resources import config_path

        with open(config_path(t.deepspeed_config), encoding="utf-8") as f:
            base = json.load(f)
    ds_cfg = deepspeed_config(t, base)
    (out / "deepspeed.json").write_text(json.dumps(ds_cfg, indent=2))

    decay, no_decay = [], []
    for name, p in task.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "token" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=t.lr, betas=tuple(t.betas))
    min_ratio = t.min_lr / t.lr if t.lr > 0 else 0.0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, t.steps, t.warmup_steps, min_ratio))
    engine, opt, _, sched = deepspeed.initialize(model=task, optimizer=opt, lr_scheduler=sched, config=ds_cfg)
    device = engine.device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision)

    ckpt_dir = out / "checkpoints"
    step = 0
    if t.resume and (ckpt_dir / "latest").is_file():
        path, client = engine.load_checkpoint(str(ckpt_dir))
        if path is None:
            raise FvlmError(f"cannot resume from {ckpt_dir} (set train.resume=false to start over)")
        step = int(client.get("step", 0))
        log.info("resumed from %s at step %d", path, step)

    g = torch.Generator().manual_seed(t.seed + step)
    loader = torch.utils.data.DataLoader(dataset, batch_size=t.batch_size, shuffle=True, drop_last=len(dataset) >= t.batch_size,
                                         collate_fn=collate, num_workers=cfg.data.num_workers, generator=g,
                                         persistent_workers=cfg.data.num_workers > 0)
    if len(loader) == 0:
        raise FvlmError("no training batches: the dataset is empty")
    metrics = open(out / "metrics.jsonl", "a", encoding="utf-8")
    losses: list[float] = []
    model = engine.module.model
    norm_pix = getattr(engine.module.loss, "norm_pix", False)
    t0 = time.perf_counter()
    micro = 0
    try:
        while step < t.steps:
            for batch in loader:
                batch = _to(batch, device, dtype)
                res = engine(batch)
                engine.backward(res["loss"])
                engine.step()
                micro += 1
                if micro % t.grad_accum:
                    continue
                step += 1
                loss = float(res["loss"].detach().float())
                losses.append(loss)
                if step % t.log_every == 0 or step == 1 or step == t.steps:
                    rec = {"step": step, "loss": loss, "lr": sched.get_last_lr()[0],
                           "sec": round(time.perf_counter() - t0, 3)}
                    metrics.write(json.dumps(rec) + "\n")
                    metrics.flush()
                    log.info("step %d loss %.4f lr %.2e", step, loss, rec["lr"])
                if t.vis_every and (step % t.vis_every == 0 or step == t.steps):
                    cols = reconstruction_images(batch, res["pred"], model.patch_size, norm_pix,
                                                 engine.module.method)
                    save_grid(out / "vis" / f"step{step:06d}.png", list(cols))
                if (t.ckpt_every and step % t.ckpt_every == 0) or step == t.steps:
                    engine.save_checkpoint(str(ckpt_dir), tag=f"step{step}", client_state={"step": step})
                    save_encoder(out / "encoder.pt", model, {"step": step, "loss": loss})
                if on_step is not None and on_step(step, loss) is False:
                    return {"steps": step, "losses": losses, "out_dir": str(out)}
                if step >= t.steps:
                    break
    finally:
        metrics.close()
    return {"steps": step, "losses": losses, "out_dir": str(out)}
