"""The X-ray masked image modelling program: radiographs -> MAE/GMML task -> the shared DeepSpeed engine.

``run(cfg, source)`` trains an :class:`~fvlm.xray.config.XrayPretrainConfig` with
:class:`fvlm.engine.trainer.Trainer`, the engine of ``fvlm pretrain``: the same optimizer,
schedule, DeepSpeed setup, exact resume, checkpoints and logs. What is X-ray specific is
plugged in: the batch stream (:class:`~fvlm.xray.batch.XrayStream`), the task module whose
output carries its loss, ``encoder.pt`` as the model file, and the reconstruction grids
(an ``on_step`` hook).

Every rank calls ``run``. Outputs in ``train.out_dir`` (rank 0): ``metrics.csv`` and ``tb/``,
``checkpoints/`` (resumable), ``encoder.pt`` (``fvlm-xray-encoder``) at every checkpoint,
``vis/stepNNNNNN.png``, ``deepspeed.json`` and ``summary.json``.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..devices import train_device
from ..engine.distributed import init_distributed
from ..engine.loader import make_loader as make_stream_loader
from ..engine.trainer import Trainer
from ..errors import FvlmError
from ..logs import get_logger
from ..models import create_model
from ..models.xray_mae import save_encoder
from .batch import XrayCollate, XrayPretrainTask, XrayStream
from .data import XrayDataset
from .visualize import save_reconstruction_figure

__all__ = ["run"]

log = get_logger("xray.pretrain")

_ENCODER_PREFIX = "model.encoder."


def run(cfg, source: str | None = None, on_ready=None) -> dict:
    """Train; returns ``{"steps", "first_loss", "last_loss", "interrupted", "skipped"}``.

    ``source``: folder or manifest of radiographs (None when ``cfg.data.cache`` holds them).
    The losses are those of this process's last micro-batch at the first and last step of this run.
    ``on_ready()`` is called once the inputs are read and a resume (if any) was accepted, before
    anything is written (the command opens its log file and writes config.yaml there).
    """
    import torch

    d, t = cfg.data, cfg.train
    out = Path(t.out_dir)
    if t.threads:
        torch.set_num_threads(t.threads)
    rank, world, _ = init_distributed()
    if t.resume == "auto" and (out / "checkpoints" / "latest").is_file() \
            and not (out / "checkpoints" / "latest_complete").is_file():
        raise FvlmError(f"{out / 'checkpoints'} was written by the earlier X-ray loop of fvlm and cannot be "
                        "resumed; use a new out_dir or set train.resume=never to start over")
    ds = XrayDataset(source, size=d.size, orientation=d.orientation, normalize=d.normalize, contour=d.contour,
                     use_window=d.use_window, cache=d.cache, flip=d.flip)
    if rank == 0:
        log.info("%d radiographs at %d px; %s masking (%s); %d process(es)", len(ds), d.size, cfg.mask.method,
                 cfg.mask.strategy if cfg.mask.method == "mae" else cfg.mask.gmml_corruption, world)
    torch.manual_seed(t.seed)
    model = create_model("xray_mae", cfg.model, img_size=d.size)
    task = XrayPretrainTask(model, cfg.mask)
    collate = XrayCollate(cfg.mask, cfg.model.patch_size)

    def make_loader(start: int):
        stream = XrayStream(ds, collate, d.batch_size, rank=rank, world=world, seed=t.seed, start=start)
        return make_stream_loader(stream, num_workers=d.num_workers, device=train_device())

    losses: dict[str, float] = {}

    def on_step(step: int, batch: dict, res: dict) -> None:
        losses.setdefault("first", float(res["loss"].detach().float()))
        losses["last"] = float(res["loss"].detach().float())
        if rank == 0 and t.vis_every and (step % t.vis_every == 0 or step == t.steps):
            names = [ds.entries[int(i)].path.stem for i in batch["index"]]
            save_reconstruction_figure(out / "vis" / f"step{step:06d}.png", batch, res["pred"], model.patch_size,
                                       task.loss.norm_pix, task.method, step=step, names=names)

    def save_model(path: Path, module, step: int, state_dict: dict | None = None) -> None:
        enc = None if state_dict is None else {
            k[len(_ENCODER_PREFIX):]: v for k, v in state_dict.items() if k.startswith(_ENCODER_PREFIX)}
        save_encoder(path, module.model, {"step": step, "loss": losses.get("last")}, state_dict=enc)

    trainer = Trainer(task, lambda res, batch: (res["loss"], {}), make_loader, t, out, micro_batch=d.batch_size,
                      save_model=save_model, on_step=on_step, model_file="encoder.pt")
    trainer.resume()
    if on_ready is not None:
        on_ready()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "deepspeed.json").write_text(json.dumps(trainer.ds_config, indent=2))
    res = trainer.fit()
    summary = {"steps": res["step"], "first_loss": losses.get("first"), "last_loss": losses.get("last"),
               "interrupted": res["interrupted"], "skipped": sorted(str(ds.entries[i].path) for i in ds.bad)}
    if rank == 0:
        if ds.bad:
            log.warning("%d image(s) skipped as unreadable; see the log", len(ds.bad))
        (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
        log.info("done at step %d; encoder: %s", res["step"], out / "encoder.pt")
    return summary
