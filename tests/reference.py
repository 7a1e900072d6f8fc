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


def _kl(target_logits, logits):
    p_log = torch.log_softmax(target_logits, dim=-1)
    return (p_log.exp() * (p_log - torch.log_softmax(logits, dim=-1))).sum(-1).mean()


def combo_meta_grad(
    model,
    tasks,
    steps,
    lr,
    *,
    query_second_order=True,
    reptile=False,
    shot_weight=0.0,
    shot_second_order=True,
    rho_inner=0.0,
    rho_outer=0.0,
    hypernet=None,
    adapted=None,
    learned_lrs=None,
    per_step=False,
    msl_weights=None,
):
    """Mean meta-gradient over classification tasks for a combination of the algorithms, by hand.

    MAML / first-order MAML (``query_second_order``), Reptile, SHOT's big-step term (K >= 2,
    KL, branch first order when ``shot_second_order`` is False), Sharp-MAML inner SAM (eps a
    constant) and outer SAM (whole meta-gradient recomputed at theta + rho G/|G| over every
    meta-parameter), HyperMAML (pure hypernetwork on the head, no warm-up), ANIL (``adapted``
    names), Meta-SGD / MAML++ learned rates (``learned_lrs``: name -> tensor, one per step when
    ``per_step``; a step of size s uses s / lr times the learned rate) and MAML++'s multi-step
    loss (``msl_weights`` for the query losses after steps 1..K).
    Returns (model grads, extra grads: ``hyper.NAME`` and ``lr.NAME``).
    """
    import torch.nn.functional as F

    names = [n for n, _ in model.named_parameters()]
    if adapted is None:
        adapted = [n for n in names if n.startswith("head.")] if hypernet is not None else names

    def out(p, x, **kw):
        return functional_call(model, p, (x,), kw)

    def support_grads(p, sx, sy, second_order):
        loss = F.cross_entropy(out(p, sx), sy)
        g = torch.autograd.grad(loss, [p[n] for n in adapted], create_graph=second_order)
        if rho_inner:
            flat = [x.detach() for x in g]
            norm = torch.sqrt(sum((x**2).sum() for x in flat))
            shifted = dict(p)
            for n, x in zip(adapted, flat):
                shifted[n] = p[n] + rho_inner * x / (norm + 1e-12)
            loss = F.cross_entropy(out(shifted, sx), sy)
            g = torch.autograd.grad(loss, [shifted[n] for n in adapted], create_graph=second_order)
        return g if second_order else [x.detach() for x in g]

    def step_size(extra, n, k, step_lr):
        if learned_lrs is None:
            return step_lr
        rate = extra["lr." + n]
        return (step_lr / lr) * (rate[min(k, steps - 1)] if per_step else rate)

    def trajectory(p, extra, sx, sy, k, step_lr, second_order):
        points = [dict(p)]
        for i in range(k):
            p = dict(p)
            g = support_grads(p, sx, sy, second_order)
            p.update({n: p[n] - step_size(extra, n, i, step_lr) * gi for n, gi in zip(adapted, g)})
            points.append(p)
        return points

    def hyper(p, extra, sx, sy):
        h = {n[len("hyper.") :]: t for n, t in extra.items() if n.startswith("hyper.")}
        feats, logits = out(p, sx, return_features=True)
        n_out, dim = p["head.weight"].shape
        onehot = F.one_hot(sy, n_out).to(feats.dtype)
        rows = torch.cat([feats, torch.softmax(logits.detach(), -1), onehot], 1)
        delta = functional_call(hypernet, h, ((onehot.T @ rows) / onehot.sum(0).unsqueeze(1),))
        return {**p, "head.weight": p["head.weight"] + delta[:, :dim], "head.bias": p["head.bias"] + delta[:, dim]}

    def meta_grad(p, extra):
        total = 0
        for sx, sy, qx, qy in tasks:
            if hypernet is not None:
                points = [p, hyper(p, extra, sx, sy)]
            else:
                points = trajectory(p, extra, sx, sy, steps, lr, query_second_order and not reptile)
            adapted_p = points[-1]
            if reptile:
                direction = {n: (p[n] - adapted_p[n]).detach() / (steps * lr) for n in adapted}
                objective = sum((p[n] * direction[n]).sum() for n in adapted)
            elif msl_weights is not None:
                objective = sum(w * F.cross_entropy(out(q, qx), qy) for w, q in zip(msl_weights, points[1:]))
            else:
                objective = F.cross_entropy(out(adapted_p, qx), qy)
            if shot_weight:
                big = trajectory(p, extra, sx, sy, 1, steps * lr, shot_second_order)[-1]
                objective = objective + shot_weight * _kl(out(adapted_p, qx).detach(), out(big, qx))
            total = total + objective
        leaves = list(p.values()) + list(extra.values())
        grads = torch.autograd.grad(total / len(tasks), leaves, allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]
        return dict(zip(names, grads[: len(names)])), dict(zip(list(extra), grads[len(names) :]))

    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    extra = {}
    if hypernet is not None:
        extra.update({"hyper." + n: p.detach().clone().requires_grad_() for n, p in hypernet.named_parameters()})
    for n, t in (learned_lrs or {}).items():
        extra["lr." + n] = t.detach().clone().requires_grad_()
    g, ge = meta_grad(params, extra)
    if not rho_outer:
        return g, ge
    norm = torch.sqrt(sum((x**2).sum() for x in [*g.values(), *ge.values()]))
    shift = {n: (params[n] + rho_outer * g[n] / norm).detach().requires_grad_() for n in params}
    eshift = {n: (extra[n] + rho_outer * ge[n] / norm).detach().requires_grad_() for n in extra}
    return meta_grad(shift, eshift)
