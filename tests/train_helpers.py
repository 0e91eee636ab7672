"""Shared by the tests that start `python -m fvlm.train` in subprocesses."""
import os


def subprocess_env() -> dict:
    """This environment, offline and single-threaded, without the launcher variables a parent
    DeepSpeed/torchrun process may have set (each run starts its own process group)."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env
