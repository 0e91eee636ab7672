"""The DeepSpeed training program (``python -m fvlm.train`` = ``fvlm pretrain``) and its generic engine."""
