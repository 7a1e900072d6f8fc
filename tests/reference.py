"""Independent meta-gradients written directly with torch.func (no metaopt code)."""

from __future__ import annotations

import torch
from torch.func import functional_call


def maml_meta_grad(model, tasks, steps, lr, loss_fn, first_order=False, names=None):
    """Mean over tasks of d L_Q(U^K(theta)) / d theta, with BatchNorm in batch-stat mode."""
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    adapted = list(params) if names is None else names
    model.train()
    total = 0
    for sx, sy, qx, qy in tasks:
        fast = dict(params)
        for _ in range(steps):
            out = functional_call(model, {**fast, **{k: v.clone() for k, v in buffers.items()}}, (sx,))
            loss = loss_fn(out, sy)
            grads = torch.autograd.grad(loss, [fast[n] for n in adapted], create_graph=not first_order)
            for n, g in zip(adapted, grads):
                fast[n] = fast[n] - lr * (g.detach() if first_order else g)
        out = functional_call(model, {**fast, **{k: v.clone() for k, v in buffers.items()}}, (qx,))
        total = total + loss_fn(out, qy)
    meta = total / len(tasks)
    grads = torch.autograd.grad(meta, list(params.values()), allow_unused=True)
    return {n: (torch.zeros_like(p) if g is None else g) for (n, p), g in zip(params.items(), grads)}
