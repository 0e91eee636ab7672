"""A generic DeepSpeed training engine: model + loss module + batch stream + config -> fit/resume/checkpoint.

Nothing here knows about CT or contrastive learning; ``fvlm pretrain`` and the X-ray MAE
program both drive it::

    trainer = Trainer(model, loss_fn, make_loader, cfg, out_dir,
                      save_model=lambda path, module, step, state_dict: ...,  # consolidated file
                      validate=lambda module, step: {"val/auc": ...},  # optional
                      on_step=lambda step, batch, out: ...)           # optional
    summary = trainer.fit()

``loss_fn(outputs, batch) -> (loss, logs)``; ``make_loader(start_micro_batch)`` returns an
iterable of batches that starts at that position of the (deterministic) stream, which is how
the data position is restored on resume. ``on_step(step, batch, outputs)`` runs on every rank
after each optimizer step with the last micro-batch and the model's outputs for it (the X-ray
program draws its reconstruction grids there). ``prepare_batch(host_batch, device)`` (optional)
turns what the loader yields into the model's batch on the device (the CT program resamples and
windows there); without it the batch's tensors are moved as they are. ``save_model(path, module, step, state_dict)``
writes ``out_dir/<model_file>`` (default ``model.pt``) at every checkpoint and ``best.pt`` at a new
best validation metric, on rank 0; ``state_dict`` is the full fp32 master weights
(:meth:`Trainer.master_state_dict`), or ``None`` when the module's own weights are those (fp32
below ZeRO-3). Validation runs on rank 0, or on every rank under ZeRO-3.

Checkpoints (``out_dir/checkpoints/<tag>/``): DeepSpeed's own files (model, optimizer,
scheduler; resumable with ZeRO partitioning) plus ``trainer_state_rank<r>.json`` / ``.pt`` per
rank (step, micro-batch position, RNG states, best metric; see :mod:`.checkpoint_io`: nothing is
unpickled); ``checkpoints/latest_complete`` is written last, so a SIGKILL mid-save leaves the
previous checkpoint as the resume point, and an unreadable latest one is skipped for the previous.
"""
from __future__ import annotations

import contextlib
import csv
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from .. import atomic, interrupts
from ..devices import to_device
from ..errors import FormatError, FvlmError
from ..logs import get_logger
from ..progress import progress
from .checkpoint_io import (check_files, make_engine_safe, read_trainer_state, set_rng_state,
                            write_trainer_state)
from .config import TrainConfig
from .distributed import deepspeed_config, init_distributed
from .schedules import build_param_groups, cosine_with_warmup

__all__ = ["Trainer", "LATEST",
           # re-exported: the pieces it is built from
           "TrainConfig", "build_param_groups", "cosine_with_warmup", "deepspeed_config", "init_distributed"]

log = get_logger("train")
LATEST = "latest_complete"


@contextlib.contextmanager
def _stopped_by_signal():
    """An error while a signal is pending is the signal's doing (a loader worker or another rank
    killed with the same process group): stop as interrupted, with the previous checkpoint."""
    try:
        yield
    except Exception:
        if interrupts.pending():
            log.warning("stopped by a signal during a step; the previous checkpoint is the resume point")
            raise KeyboardInterrupt from None
        raise


def _memory() -> dict[str, float]:
    """Peak resident memory of this process (MB) and, on GPU, peak allocated device memory (MB)."""
    import resource

    out = {"mem/peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["mem/peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _accumulate(sums: dict, key: str, v) -> None:
    """Add a logged value to the window's running sum without a host sync: tensors are reduced to a
    0-d tensor on their device and read only at the log interval (as nanoGPT and open_clip do)."""
    v = v.detach().float().mean() if isinstance(v, torch.Tensor) else float(v)
    sums[key] = sums[key] + v if key in sums else v


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """See the module docstring. Call :meth:`fit` on every rank."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable, make_loader: Callable[[int], Iterable],
                 cfg: TrainConfig, out_dir: str | os.PathLike, micro_batch: int,
                 save_model: Callable[[Path, torch.nn.Module, int, dict | None], None] | None = None,
                 validate: Callable[[torch.nn.Module, int], dict] | None = None,
                 on_step: Callable[[int, Any, Any], None] | None = None, model_file: str = "model.pt",
                 desc: str = "pretrain", prepare_batch: Callable[[Any, torch.device], Any] | None = None):
        import deepspeed

        self.cfg = cfg
        self.out = Path(out_dir)
        self.loss_fn = loss_fn
        self.make_loader = make_loader
        self.save_model = save_model
        self.validate = validate
        self.on_step = on_step
        self.prepare_batch = prepare_batch
        self.model_file = model_file
        self.desc = desc
        self.micro_batch = int(micro_batch)
        self.rank, self.world, self.local_rank = init_distributed()
        self.device = torch.device(f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu")
        self.ckpt_dir = self.out / "checkpoints"
        groups = build_param_groups(model, cfg)
        if not groups:
            raise FvlmError("no trainable parameters (everything frozen?)")
        opt_ = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
        sched_fn = cosine_with_warmup(cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)
        self.ds_config = deepspeed_config(cfg, micro_batch, self.world)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=opt_, config=self.ds_config,
            lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, sched_fn))
        self.step = 0
        self.micro = 0
        self.best: float | None = None
        self._stop_group = None   # the gloo group that agrees on a signal (several ranks)
        self.resumed: bool | None = None   # set by resume(); fit() resumes unless the caller already did

    # ------------------------------------------------------------------ checkpoints
    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def _latest_tag(self, ckpt_dir: Path) -> str | None:
        p = ckpt_dir / LATEST
        return p.read_text().strip() if p.is_file() else None

    def save(self) -> Path:
        """Save a resumable checkpoint (all ranks) and the consolidated model (rank 0).

        The checkpoint is written to ``checkpoints/.partial-<tag>`` and renamed to ``<tag>`` once
        every rank's part is there, then ``latest_complete`` points at it: a save cut short (a
        second Ctrl-C, SIGKILL) leaves no ``step_*`` directory behind, and the next save clears it."""
        tag = f"step_{self.step:08d}"
        stage = self.ckpt_dir / f".partial-{tag}"
        if self.rank == 0:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            for old in self.ckpt_dir.glob(".partial-step_*"):
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        atomic.register(stage)
        try:
            self.engine.save_checkpoint(str(self.ckpt_dir), tag=stage.name, save_latest=False)
            write_trainer_state(stage, self.rank,
                                {"step": self.step, "micro": self.micro, "best": self.best, "world": self.world})
            dist.barrier()
        except BaseException:   # a second Ctrl-C, a full disk: no half-written checkpoint stays behind
            shutil.rmtree(stage, ignore_errors=True)
            raise
        if self.rank == 0:
            final = self.ckpt_dir / tag
            if final.exists():   # the same step saved before (a resume from an older checkpoint)
                shutil.rmtree(final)
            os.replace(stage, final)
            with atomic.replacing(self.ckpt_dir / LATEST) as tmp:
                tmp.write_text(tag)
            tags = sorted(p.name for p in self.ckpt_dir.glob("step_*") if p.is_dir())
            for old in tags[:-max(1, self.cfg.keep_checkpoints)]:
                shutil.rmtree(self.ckpt_dir / old, ignore_errors=True)
        self._save_model(self.model_file)
        dist.barrier()
        atomic.unregister(stage)   # renamed by rank 0 (a stop before this removes at most an empty name)
        return self.ckpt_dir / tag

    def _save_model(self, name: str) -> None:
        """``save_model(out/name, module, step, state_dict)`` on rank 0 with the fp32 master weights
        (gathered on every rank: call on all ranks)."""
        if self.save_model is None:
            return
        sd = self.master_state_dict()
        if self.rank == 0:
            self.save_model(self.out / name, self.module, self.step, sd)

    def master_state_dict(self) -> dict | None:
        """The full fp32 master weights as a CPU state dict on rank 0 (``None`` on other ranks, and
        ``None`` where the module's own weights are the master weights: fp32 below ZeRO-3).

        A collective: every rank calls it. With bf16/fp16 the module holds rounded copies and the
        optimizer the fp32 masters (partitioned under ZeRO-1/2); under ZeRO-3 the module holds only
        this rank's partition. Each trainable parameter is assembled from the optimizer's fp32
        partitions (``deepspeed.utils.safe_get_full_fp32_param``); a frozen one, which has no master
        copy, is gathered as the module holds it. Nothing is read back from checkpoint files.
        """
        stage = self.engine.zero_optimization_stage()
        if self.cfg.precision == "fp32" and stage < 3:
            return None
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        full: dict[int, torch.Tensor] = {}
        named = list(self.module.named_parameters(remove_duplicate=False))
        for _, p in named:                       # same order on every rank: the collectives match
            if id(p) in full:
                continue
            t = safe_get_full_fp32_param(p)
            if t is None and hasattr(p, "ds_id"):
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    t = p.detach().clone()
            elif t is None:
                t = p.detach()
            full[id(p)] = t.detach().float().cpu().reshape(p.ds_shape if hasattr(p, "ds_shape") else p.shape)
        if self.rank != 0:
            return None
        by_name = {n: full[id(p)] for n, p in named}
        own = self.module.state_dict()         # buffers (never partitioned) and the key order
        return {k: (by_name[k].clone() if k in by_name else v.detach().cpu()) for k, v in own.items()}

    def _candidates(self, ckpt_dir: Path, explicit: str | None) -> list[str]:
        """Tags to try, best first: the explicit one; else the ``latest_complete`` pointer, then
        every older ``step_*`` directory (newest first), so a truncated or missing latest checkpoint
        falls back to the previous complete one."""
        if explicit is not None:
            return [explicit]
        tags = sorted((p.name for p in ckpt_dir.glob("step_*") if p.is_dir()), reverse=True)
        latest = self._latest_tag(ckpt_dir)
        if latest is None:
            # no pointer: only directories whose save finished on every rank of this run's size
            return [t for t in tags if all((ckpt_dir / t / f"trainer_state_rank{r}.json").is_file()
                                           for r in range(self.world))]
        return [latest] + [t for t in tags if t < latest]

    def _agree(self, ok: bool) -> bool:
        """True only if every rank says ``ok`` (so all ranks fall back together)."""
        if self.world == 1:
            return ok
        t = torch.tensor([1 if ok else 0], dtype=torch.int32, device=self.device)  # NCCL: on the GPU
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def resume(self) -> bool:
        """Restore from ``cfg.resume``; returns whether a checkpoint was loaded.

        Nothing is unpickled (see :mod:`fvlm.engine.checkpoint_io`). With ``resume: auto`` an
        unreadable, truncated, incomplete or crafted latest checkpoint is skipped with a warning
        and the previous complete one is used; a checkpoint written by another number of processes
        is an error, never skipped."""
        self.resumed = False
        r = self.cfg.resume
        if r == "never":
            return False
        ckpt_dir = self.ckpt_dir if r == "auto" else Path(r)
        explicit = None
        if r != "auto" and (ckpt_dir / "trainer_state_rank0.json").is_file():
            explicit, ckpt_dir = ckpt_dir.name, ckpt_dir.parent
        elif r != "auto" and (ckpt_dir / "trainer_state_rank0.pt").is_file():
            raise FvlmError(f"train.resume: {ckpt_dir} was written by an older fvlm (pickled trainer state, "
                            "which fvlm no longer unpickles); restart the run or resume from a newer checkpoint")
        cands = self._candidates(ckpt_dir, explicit)
        if not cands:
            if r != "auto":
                raise FvlmError(f"train.resume: no checkpoint in {r}")
            return False
        make_engine_safe(self.engine)
        reasons = []

        def skip(i: int, why: str) -> None:
            reasons.append(f"{cands[i]}: {why}")
            if explicit is None and i + 1 < len(cands):
                log.warning("cannot resume from %s (%s); falling back to %s", ckpt_dir / cands[i], why, cands[i + 1])

        for i, tag in enumerate(cands):
            tag_dir = ckpt_dir / tag
            why = None
            st = ts = None
            try:
                if not tag_dir.is_dir():
                    raise FormatError(f"{tag_dir} is missing")
                st, ts = read_trainer_state(tag_dir, self.rank)
                why = check_files(tag_dir)
            except FvlmError as e:
                why = str(e)
            if st is not None and st["world"] != self.world:
                raise FvlmError(f"checkpoint {tag_dir} was written by {st['world']} processes, this run has "
                                f"{self.world}; exact resume needs the same number")
            if not self._agree(why is None):
                skip(i, why or "another rank could not read its part of it")
                continue
            try:
                path, _ = self.engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                                      load_lr_scheduler_states=True)
            except FvlmError as e:
                path, why = None, str(e)
            except (RuntimeError, KeyError, ValueError) as e:   # the files are fine; the model is not the same
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                if "size mismatch" in str(e) or "Missing key" in str(e) or "Unexpected key" in str(e):
                    first = "the checkpoint's model does not match this run's model (another model config?)"
                raise FvlmError(f"cannot resume from {tag_dir}: {first[:300]}; use a new output directory or "
                                "train.resume=never") from None
            if path is None:
                why = why or "DeepSpeed could not load it"
                if self.world > 1:   # ranks may be out of step inside DeepSpeed: do not guess further
                    raise FvlmError(f"could not load the DeepSpeed checkpoint {tag_dir}: {why}")
                skip(i, why)
                continue
            self.step, self.micro, self.best = int(st["step"]), int(st["micro"]), st.get("best")
            set_rng_state(st["rng"], ts)
            if i:
                log.warning("resumed from %s, an older checkpoint than the latest (%s)", tag_dir, cands[0])
            log.info("resumed from %s (step %d)", tag_dir, self.step)
            self.resumed = True
            return True
        raise FvlmError("train.resume: no usable checkpoint in " + str(ckpt_dir) + ": " + "; ".join(reasons))

    # ------------------------------------------------------------------ logging
    def _open_logs(self):
        self.tb = None
        if self.rank != 0:
            return
        for name in ("metrics.csv", "validation.csv"):
            path = self.out / name
            if not path.is_file():
                continue
            with open(path, newline="") as f:   # drop rows beyond the resume point (they will be redone)
                rows = list(csv.DictReader(f))
            keep = [r for r in rows if int(float(r.get("step", 0) or 0)) <= self.step]
            if rows:
                with open(path, "w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
                    w.writeheader()
                    w.writerows(keep)
        if self.cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.out / "tb"), purge_step=self.step + 1)
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                log.warning("tensorboard is not installed; logging to CSV only")

    def _write_row(self, row: dict, name: str = "metrics.csv") -> None:
        """Append a row to ``out_dir/<name>`` (columns fixed by the file's first row) and TensorBoard."""
        if self.rank != 0:
            return
        path = self.out / name
        exists = path.is_file() and path.stat().st_size > 0
        fields = None
        if exists:
            with open(path, newline="") as f:
                fields = next(csv.reader(f), None)
        if not fields:
            fields = list(row.keys())
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if not exists:
                w.writeheader()
            w.writerow({k: row.get(k, "") for k in fields})
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, self.step)
            self.tb.flush()

    def _reduce(self, sums: dict, count: int) -> dict[str, float]:
        """Means over the window and all ranks of ``sums`` (floats, or 0-d tensors still on the
        device): one stack, one all_reduce and one device-to-host copy at the log interval."""
        keys = sorted(sums)
        vals = [torch.as_tensor(sums[k], dtype=torch.float64, device=self.device).reshape(()) for k in keys]
        t = torch.stack(vals + [torch.tensor(float(count), dtype=torch.float64, device=self.device)])
        if self.world > 1:
            dist.all_reduce(t)
        t = t.cpu().tolist()
        n = t[-1]
        return {k: (t[i] / n if n else float("nan")) for i, k in enumerate(keys)}

    # ------------------------------------------------------------------ validation
    def _run_validation(self) -> dict:
        if self.validate is None:
            return {}
        # Rank 0 validates; under ZeRO-3 every forward gathers partitioned weights (a collective),
        # so every rank runs the same validation and rank 0's numbers are kept.
        metrics = {}
        if self.rank == 0 or self.engine.zero_optimization_stage() == 3:
            self.module.eval()
            try:
                with torch.no_grad():
                    metrics = self.validate(self.module, self.step) or {}
            finally:
                self.module.train()
        if self.world > 1:   # rank 0's numbers everywhere, so all ranks agree on best.pt
            obj = [metrics]
            dist.broadcast_object_list(obj, src=0)
            metrics = obj[0]
        m = self.cfg.val_metric
        if m and m in metrics and math.isfinite(metrics[m]):
            v = metrics[m]
            better = self.best is None or (v > self.best if self.cfg.val_mode == "max" else v < self.best)
            if better:
                self.best = v
                self._save_model("best.pt")        # all ranks: the master weights are gathered
                log.info("new best %s = %.4f at step %d", m, v, self.step)
        return metrics

    # ------------------------------------------------------------------ loop
    def _signalled(self) -> bool:
        """Whether any rank got SIGINT/SIGTERM (all ranks stop after the same step). With several
        ranks this is one small collective per step, over gloo on the CPU, so the host does not
        wait for the device."""
        if self.world == 1:
            return interrupts.pending()
        if self._stop_group is None:
            self._stop_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        t = torch.tensor([1 if interrupts.pending() else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._stop_group)
        return bool(t.item())

    def fit(self) -> dict:
        """Train to ``cfg.steps``. SIGINT/SIGTERM (see :mod:`fvlm.interrupts`): the step that is
        running finishes, a checkpoint is saved and ``KeyboardInterrupt`` is raised (exit 130;
        the same command resumes); a second signal, or one during setup or validation, raises at
        once and leaves the previous checkpoint as the resume point."""
        with interrupts.interrupts():
            return self._fit()

    def _train_step(self, loader, sums: dict, times: dict) -> tuple[Any, Any]:
        """One optimizer step: ``grad_accum`` micro-batches through forward, backward and the engine's
        step. The losses and logs are added to ``sums`` (still on the device: no host sync), the phase
        times to ``times``. Returns the last micro-batch and the model's outputs for it."""
        for _ in range(self.cfg.grad_accum):
            t0 = time.perf_counter()
            batch = next(loader)
            # the loader's host batch -> the model's batch on the device (resampling, windowing,
            # augmentation run here, batched, where they are cheap)
            batch = (self.prepare_batch(batch, self.device) if self.prepare_batch is not None
                     else to_device(batch, self.device))
            t1 = time.perf_counter()
            out = self.engine(batch)
            loss, logs = self.loss_fn(out, batch)
            t2 = time.perf_counter()
            self.engine.backward(loss)
            t3 = time.perf_counter()
            self.engine.step()
            t4 = time.perf_counter()
            self.micro += 1
            times["time/data"] += t1 - t0
            times["time/forward"] += t2 - t1
            times["time/backward"] += t3 - t2
            times["time/optimizer"] += t4 - t3
            _accumulate(sums, "loss", loss)
            for k, v in logs.items():
                _accumulate(sums, k, v)
        return batch, out

    def _log_window(self, sums: dict, times: dict, count: int, elapsed: float, bar) -> dict:
        """The row of the log window that ends at this step (means over its ``count`` micro-batches
        and all ranks): written to metrics.csv / TensorBoard, logged on rank 0; returns it."""
        row = {"step": self.step, **self._reduce({**sums, **times}, count)}
        row["lr"] = float(self.scheduler.get_last_lr()[0]) if self.scheduler is not None else self.cfg.lr
        row["samples_per_s"] = count * self.micro_batch * self.world / max(elapsed, 1e-9)
        row.update(_memory())
        self._write_row(row)
        if self.rank == 0:
            log.info("step %d loss %.4f lr %.2e %.1f samples/s", self.step, row["loss"], row["lr"],
                     row["samples_per_s"])
            if bar is not None:
                bar.set_postfix(loss=f"{row['loss']:.3f}")
        return row

    def _validate_and_log(self) -> dict:
        """Validation at this step, its row in validation.csv and a log line; returns the metrics."""
        val_metrics = self._run_validation()
        if val_metrics:
            self._write_row({"step": self.step, **val_metrics}, "validation.csv")
            if self.rank == 0:
                log.info("validation at step %d: %s", self.step, ", ".join(
                    f"{k}={v:.4f}" for k, v in sorted(val_metrics.items())))
        return val_metrics

    def _fit(self) -> dict:
        cfg = self.cfg
        if self.resumed is None:
            self.resume()
        self.out.mkdir(parents=True, exist_ok=True)
        self._open_logs()
        gas = cfg.grad_accum
        loader = iter(self.make_loader(self.micro))
        self.engine.train()
        bar = progress(total=cfg.steps, desc=self.desc, unit="step", initial=self.step) if self.rank == 0 else None
        sums: dict[str, float] = {}
        times = {"time/data": 0.0, "time/forward": 0.0, "time/backward": 0.0, "time/optimizer": 0.0}
        count, t_window, run_steps = 0, time.perf_counter(), 0
        last_row: dict = {}
        val_metrics: dict = {}
        while self.step < cfg.steps:
            with interrupts.deferred(), _stopped_by_signal():   # a signal lets the step finish and be saved
                batch, out = self._train_step(loader, sums, times)
                count += gas
                self.step += 1
                run_steps += 1
                if bar is not None:
                    bar.update(1)
                final = self.step >= cfg.steps
                signalled = self._signalled()
                stop_now = signalled or bool(cfg.stop_after and run_steps >= cfg.stop_after)
                if self.step % max(1, cfg.log_every) == 0 or final or stop_now:
                    last_row = self._log_window(sums, times, count, time.perf_counter() - t_window, bar)
                    sums, times = {}, {k: 0.0 for k in times}
                    count, t_window = 0, time.perf_counter()
            if self.validate is not None and not signalled and (
                    (cfg.val_every and self.step % cfg.val_every == 0) or final):
                val_metrics = self._validate_and_log()
            with interrupts.deferred():
                if self.on_step is not None:
                    self.on_step(self.step, batch, out)
                if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or final or stop_now:
                    self.save()
            if signalled:
                if bar is not None:
                    bar.close()
                log.warning("stopped by a signal at step %d with a checkpoint; run the same command to resume",
                            self.step)
                raise KeyboardInterrupt
            if stop_now:
                break
        if bar is not None:
            bar.close()
        if self.tb is not None:
            self.tb.close()
        return {"step": self.step, "last": last_row, "val": val_metrics, "best": self.best,
                "interrupted": self.step < cfg.steps}
