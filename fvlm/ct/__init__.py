"""The CT pretraining program (``fvlm pretrain``, ``python -m fvlm.train``): anatomy-level
vision-language pretraining on preprocessed shards, on the shared engine (:mod:`fvlm.engine`).

- :mod:`.config`: ``PretrainConfig`` (``data.`` = :class:`fvlm.data.ct.CTDataConfig`);
- the batch stream: :class:`fvlm.data.ct.CTStream` (a ``BatchStream``; the sample path owns it);
- :mod:`.pretrain`: the task (``prepare()``: model + contrastive loss), ``run()``, ``main()``;
- :mod:`.validate`: the quick validation during training.
"""
