"""Dense heads on the shared encoder: segmentation, text-driven (zero-shot) segmentation, grounding.

- :mod:`fvlm.dense.metrics`: Dice/IoU per class, pointing game (pure numpy).
- :mod:`fvlm.dense.heads`: the progressive-upsampling segmentation head (2D/3D).
- :mod:`fvlm.dense.aggregation`: cost volume of image-text cosine similarities and its
  aggregation over space and over the prompt set, with guided upsampling.
- :mod:`fvlm.dense.model`: :class:`DenseModel` = encoder + head; building, saving, loading.
- :mod:`fvlm.dense.data`: training/eval samples from shards, the shipped CT samples, the demo corpus.
- :mod:`fvlm.dense.train`, :mod:`fvlm.dense.evaluate`, :mod:`fvlm.dense.ground`: the commands' logic.
"""
