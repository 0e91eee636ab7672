"""The training engine every program runs on (``fvlm.ct``, ``fvlm.xray``, ``fvlm.dense``).

- :mod:`.config`: ``TrainConfig``, the ``train:`` section (torch-free);
- :mod:`.trainer`: ``Trainer`` (fit / resume / checkpoints / metrics.csv / TensorBoard);
- :mod:`.distributed`: ``init_distributed()``, ``deepspeed_config()``;
- :mod:`.schedules`: ``cosine_with_warmup()``, ``build_param_groups()``;
- :mod:`.checkpoint_io`: the trainer-state files of a checkpoint (nothing is unpickled);
- :mod:`.zero`: ``gathered(params)`` for ZeRO-3 reads outside a training step;
- :mod:`.loader`: ``make_loader(stream)`` over a ``BatchStream``, ``case_batches(...)`` for evaluation.

Nothing here knows about CT, X-rays or dense heads; the engine never imports a program.
"""
