"""One rank of tests/test_collectives.py's real ZeRO-3 run (started by torch.distributed.run)."""
import datetime
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
import test_collectives as T  # noqa: E402

import fvlm.models.fvlm as fvlm_mod  # noqa: E402


def main(out: str) -> None:
    import deepspeed

    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False, timeout=datetime.timedelta(seconds=60))
    model = T._text_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
           "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    partitioned = fvlm_mod._is_partitioned(engine.module.text_encoder)
    per_step, feats = T._run_text_steps(rank, engine.module)
    dist.barrier()
    torch.save({"partitioned": partitioned, "per_step": per_step, "feats": feats}, f"{out}.{rank}")


if __name__ == "__main__":
    main(sys.argv[1])
