"""The dense task: the network and its loss as one module for the engine, and the prompt bank.

``DenseTask(model, loss_fn, prompts).forward(batch)`` -> loss parts (``{"loss": ...}`` for the
``seg`` head, the :class:`fvlm.losses.dense.MixedSupervisionLoss` parts for the ``text`` head).
The network computes logits only; the loss module turns them into the loss (as the X-ray task does).
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["DenseTask", "PromptBank"]


class PromptBank:
    """Embeds prompt phrases once (frozen text encoder) -> ``(T, E)`` per phrase, T = templates."""

    def __init__(self, text_encoder, templates: Sequence[str]):
        self.enc = text_encoder
        self.templates = list(templates)
        self.cache: dict = {}

    @property
    def dim(self) -> int:
        return self.enc.embed_dim

    def __call__(self, phrases: Sequence[str]):
        todo = [p for p in dict.fromkeys(phrases) if p not in self.cache]
        if todo:
            texts = [t.format(p) if "{}" in t else f"{t} {p}" for p in todo for t in self.templates]
            with torch.no_grad():
                e = self.enc.encode(texts).float().cpu()
            e = e.reshape(len(todo), len(self.templates), -1)
            for p, v in zip(todo, e):
                self.cache[p] = v
        return torch.stack([self.cache[p] for p in phrases])  # (K, T, E)


class DenseTask(torch.nn.Module):
    """The dense model and its loss as one module: ``forward(batch)`` -> loss parts. The prompt
    bank (frozen text encoder) is held outside the module's parameters."""

    def __init__(self, model, loss_fn, prompts: PromptBank | None):
        super().__init__()
        self.model = model
        self.loss = loss_fn
        self.__dict__["prompts"] = prompts      # not a submodule: never trained, saved or partitioned

    def forward(self, batch: dict) -> dict:
        x = batch["image"]
        if self.model.task == "seg":
            return {"loss": self.loss(self.model(x), batch["label"])}
        emb = self.prompts(batch["prompts"]).to(x.device, x.dtype)          # (B*K, T, E)
        emb = emb.reshape(x.shape[0], batch["k"], *emb.shape[1:])
        return self.loss(self.model(x, emb), batch["mask"], batch["weight"], batch["full"], batch["label"])
