"""``python -m fvlm.train``: the entry point for torchrun and the deepspeed launcher (the CT
pretraining program, :func:`fvlm.ct.pretrain.main`)."""
import sys

from ..ct.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
