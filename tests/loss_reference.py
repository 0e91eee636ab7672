"""The fine-grained loss as it was before issue 16: one gather per name and field, a host sync per name.

Kept only as the numerical reference (tests/test_loss.py, tests/test_collectives.py) and the
baseline of benchmarks/pretrain_bench.py. ``per_name_loss(loss_module, out, batch)`` takes the
current module (for its config, rules and label groups) and ``out`` with per-name dicts.
"""
from __future__ import annotations

import torch

from fvlm.losses.calibration import STATUS_NOT_MENTIONED, PairContext


def per_name_loss(self, out: dict, batch: dict):
    scale = out["logit_scale"]
    bias = out.get("logit_bias")
    status = batch.get("status")
    gstatus = batch.get("global_status")
    labels = batch.get("labels")
    if status is not None:
        status = self._gather(status, False)
    if gstatus is not None:
        gstatus = self._gather(gstatus, False)
    if labels is not None:
        labels = self._gather(labels.float(), False)
    text_ref = out.get("text_ref") or {}

    logs: dict[str, torch.Tensor] = {}
    anat_terms, anat_w = [], []
    global_term = None
    anchor = None
    for name, img in out["image"].items():
        txt = out["text"][name]
        anchor = img.sum() * 0 + txt.sum() * 0 if anchor is None else anchor
        is_global = name == "global"
        w_term = self.cfg.global_weight if is_global else self.cfg.anatomy_weight
        if w_term == 0:
            continue
        valid = self._gather(out["valid"][name], False).bool()
        g_img = self._gather(img, True)
        g_txt = self._gather(txt, True)
        n_valid = int(valid.sum())
        logs[f"n/{name}"] = torch.tensor(float(n_valid))
        if n_valid < self.cfg.min_valid:
            continue
        idx = valid.nonzero(as_tuple=True)[0]
        if is_global:
            st = gstatus if gstatus is not None else torch.full((valid.shape[0],), STATUS_NOT_MENTIONED)
        elif status is not None and name in self.anatomies:
            st = status[:, self.anatomies.index(name)]
        else:
            st = torch.full((valid.shape[0],), STATUS_NOT_MENTIONED)
        st = st.to(img.device)[idx]
        lab = self._labels_for(name, labels)
        ref = text_ref.get(name)
        ctx = PairContext(name=name, status=st, labels=None if lab is None else lab[idx].to(img.device),
                          text_ref=None if ref is None else self._gather(ref, False)[idx])
        pw = self.pair_weights(ctx, calibrate=(not is_global) or self.cfg.calibrate_global)
        logits = scale * (g_img[idx].float() @ g_txt[idx].float().t())
        if self.cfg.kind == "sigmoid":
            from fvlm.losses.targets import sigmoid_pair_loss

            term = sigmoid_pair_loss(logits + bias if bias is not None else logits, pw)
        else:
            from fvlm.losses.targets import soft_infonce

            term = soft_infonce(logits, pw)
        logs[f"loss/{name}"] = term.detach()
        if is_global:
            global_term = term
        else:
            anat_terms.append(term)
            anat_w.append(1.0 if self.cfg.anatomy_weighting == "equal" else float(n_valid))

    total = anchor if anchor is not None else torch.zeros(())
    if anat_terms:
        w = torch.tensor(anat_w, device=anat_terms[0].device)
        a = (torch.stack(anat_terms) * (w / w.sum())).sum()
        logs["loss/anatomy_mean"] = a.detach()
        total = total + self.cfg.anatomy_weight * a
    if global_term is not None:
        total = total + self.cfg.global_weight * global_term
    logs["logit_scale"] = scale.detach().float()
    logs["temperature"] = (1.0 / scale.detach().float())
    return total, logs
