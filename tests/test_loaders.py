"""The training loaders: every trainer reads through fvlm.data.loader.make_loader, which pins host
batches on CUDA (so the trainer's non_blocking copy overlaps compute) and keeps prefetching workers."""
import torch

import fvlm.engine.loader as loader_mod
import fvlm.devices as devices
from fvlm.engine.loader import _kwargs


def test_kwargs_pin_on_cuda_only_and_prefetch_with_workers():
    assert _kwargs(0, 2, "cpu", True) == {"num_workers": 0, "pin_memory": False}
    kw = _kwargs(2, 3, torch.device("cuda:1"), True)
    assert kw == {"num_workers": 2, "pin_memory": True, "prefetch_factor": 3, "persistent_workers": True,
                  "worker_init_fn": loader_mod._ignore_signals}   # the main process owns Ctrl-C / SIGTERM


def test_ct_pretraining_reads_through_the_pinning_loader(tmp_path, monkeypatch):
    """A 2-step tiny run whose process pretends its device is a GPU: its DataLoader asks to pin."""
    from fvlm.ct.pretrain import main

    seen = []
    real = loader_mod.make_loader

    def recording(stream, **kw):
        dl = real(stream, **kw)
        seen.append((kw, dl.pin_memory, dl.num_workers))
        return dl

    monkeypatch.setattr(loader_mod, "make_loader", recording)
    monkeypatch.setattr(devices, "train_device", lambda: torch.device("cuda:0"))   # the loader's view only
    rc = main(["--config", "train/tiny.yaml", "--out", str(tmp_path / "run"), "--set", "train.steps=2",
               "--set", "data.num_workers=1", "--set", "train.ckpt_every=0", "--set", "val.enabled=false",
               "--set", "train.tensorboard=false"])
    assert rc in (0, None)
    assert len(seen) == 1
    kw, pinned, workers = seen[0]
    assert kw["device"] == torch.device("cuda:0") and pinned is True and workers == 1
    assert (tmp_path / "run" / "model.pt").exists()


class _FeederHookSet(torch.utils.data.IterableDataset):
    def __iter__(self):
        import multiprocessing.queues
        import signal
        hook = multiprocessing.queues.Queue._on_queue_feeder_error
        yield torch.tensor([hook is loader_mod._feeder_error, signal.getsignal(signal.SIGINT) == signal.SIG_IGN])


def test_workers_ignore_signals_and_exit_quietly_when_the_main_process_is_gone(capsys):
    # set in the worker only: the main process keeps Python's hook and its Ctrl-C
    dl = torch.utils.data.DataLoader(_FeederHookSet(), batch_size=None, num_workers=1,
                                     worker_init_fn=loader_mod._ignore_signals)
    assert next(iter(dl)).tolist() == [True, True]
    import multiprocessing.queues
    assert multiprocessing.queues.Queue._on_queue_feeder_error is not loader_mod._feeder_error
    loader_mod._feeder_error(ConnectionResetError(104, "Connection reset by peer"), None)
    loader_mod._feeder_error(BrokenPipeError(32, "Broken pipe"), None)
    assert capsys.readouterr().err == ""
    loader_mod._feeder_error(ValueError("not a closed pipe"), None)
    assert "ValueError: not a closed pipe" in capsys.readouterr().err
