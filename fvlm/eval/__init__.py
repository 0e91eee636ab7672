"""Zero-shot evaluation of pretrained checkpoints: metrics, scoring, reports.

``fvlm.eval.metrics`` is pure numpy; ``fvlm.eval.zeroshot`` runs the suite against
any model exposing ``encode_image`` / ``encode_text`` (see docs/DEVELOPING.md).
"""
