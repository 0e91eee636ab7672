"""The ZeRO-3 gather the evaluation code uses (fvlm.train.zero): a no-op without partitioned
parameters (no DeepSpeed import), a GatheredParameters block around the read with them."""
import contextlib
import sys
import types

import torch

from fvlm.eval.prompts import model_logit_scale
from fvlm.engine.zero import gathered


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))


def test_no_partitioned_parameter_is_a_no_op(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # importing it would fail
    with gathered([torch.nn.Parameter(torch.zeros(1))]):
        pass
    assert abs(model_logit_scale(_Model()) - float(torch.tensor(2.0).exp())) < 1e-4


def test_partitioned_logit_scale_is_read_inside_a_gather(monkeypatch):
    seen = []

    @contextlib.contextmanager
    def gathered_parameters(params):
        seen.append(("enter", list(params)))
        yield
        seen.append(("exit",))

    fake = types.SimpleNamespace(zero=types.SimpleNamespace(GatheredParameters=gathered_parameters))
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    m = _Model()
    m.logit_scale.ds_id = 7
    assert abs(model_logit_scale(m) - float(torch.tensor(2.0).exp())) < 1e-4
    assert [s[0] for s in seen] == ["enter", "exit"] and seen[0][1][0] is m.logit_scale
