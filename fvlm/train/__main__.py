"""``python -m fvlm.train``: the entry point for torchrun and the deepspeed launcher."""
import sys

from .pretrain import main

if __name__ == "__main__":
    sys.exit(main())
