"""``python -m fvlm.train``: the launcher of the CT pretraining program (:mod:`fvlm.ct`) for torchrun
and the deepspeed launcher. The engine moved to :mod:`fvlm.engine`; the modules here are the old
names, kept for one release."""
