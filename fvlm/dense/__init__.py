"""Dense heads on the shared encoder: segmentation, text-driven (zero-shot) segmentation, grounding.

- :mod:`fvlm.dense.metrics`: Dice/IoU per class, pointing game (pure numpy).
- the networks live in the library with the other models: :mod:`fvlm.models.dense_heads`
  (progressive-upsampling segmentation head, 2D/3D), :mod:`fvlm.models.text_seg` (cost volume
  of image-text similarities aggregated over space and prompts), :mod:`fvlm.models.dense`
  (:class:`DenseModel` = encoder + head; building, saving, loading; ``create_model("dense", ...)``).
- :mod:`fvlm.dense.cases`: the case records every source builds.
- :mod:`fvlm.dense.data`: training/eval samples from shards, the shipped CT samples, the demo corpus.
- :mod:`fvlm.dense.train`, :mod:`fvlm.dense.evaluate`, :mod:`fvlm.dense.ground`: the commands' logic.
"""
