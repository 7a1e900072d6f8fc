"""Proto-MAML (Triantafillou et al., ICLR 2020, "Meta-Dataset"): the head starts at the prototypes.

Each task's linear head is initialised from the support set before the inner loop: with
``mu_c`` the mean embedding of class ``c``'s support examples,

    W_c = 2 mu_c,   b_c = -||mu_c||^2,

so the unadapted model is a prototypical network (Snell et al., 2017): its logits are
``-||z - mu_c||^2`` up to a term shared by every class.  The inner loop then adapts from there.
During training the prototypes keep their graph, so the backbone also learns through the
initialisation (the paper's full Proto-MAML); ``first_order_init=True`` cuts that path.  The
meta-learned head itself is not used.  With one shot per class a support example sits on its
own prototype, so the support loss at the start is already small and the inner steps move little:
in one-shot tasks Proto-MAML behaves close to a prototypical network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metaopt.errors import ConfigError
from metaopt.hookspecs import hookimpl
from metaopt.task import Task

HEAD = ("head.weight", "head.bias")


def prototype_head(features: torch.Tensor, labels: torch.Tensor, ways: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, b)`` of the linear layer equivalent to squared-Euclidean prototype scores."""
    onehot = F.one_hot(labels, ways).to(features.dtype)
    counts = onehot.sum(0).clamp(min=1).unsqueeze(1)
    prototypes = (onehot.T @ features) / counts
    return 2 * prototypes, -(prototypes * prototypes).sum(1)


class ProtoHead:
    """Proto-MAML: every task's head starts at its support prototypes (then adapts as usual)."""

    name = "proto_head"
    vmap_safe = True  # runs under engine="vmap" (tests/plugins/test_proto_head.py, tests/test_engine.py)
    classification_only = True  # its head holds one row per class
    incompatible_with = {
        "hypermaml": "HyperMAML generates the head update from the meta-learned head; with proto_head that head "
        "is never used. Use one of them.",
        "reptile": "Reptile's meta-gradient (theta - theta_K) reaches neither the prototypes nor the backbone "
        "through them; use proto_head with MAML or fomaml.",
        "convergent_fo": "the convergent estimator differentiates the inner loop from the meta-parameters, not "
        "from a head built from the support set; use proto_head with MAML or fomaml.",
    }

    def __init__(self, first_order_init: bool = False) -> None:
        self.first_order_init = bool(first_order_init)

    @hookimpl
    def configure(self, learner) -> None:
        head = getattr(learner.model, "head", None)
        if not isinstance(head, nn.Linear) or head.out_features < 2:
            raise ConfigError(
                "proto_head needs a classifier with a Linear `head` of >= 2 outputs (one per way) and "
                "forward(x, return_features=True); wrap yours as metaopt.HeadedModel(body, nn.Linear(dim, ways)). "
                f"Got head={head!r}."
            )
        self.ways = head.out_features

    @hookimpl
    def task_start(self, task: Task) -> None:
        missing = [n for n in HEAD if n not in task.start]
        if missing:
            raise ConfigError(
                f"proto_head sets {missing} per task, but they are not adapted parameters; adapt the head "
                "(no plugin may narrow the adapted set to exclude it)."
            )
        features, _ = task.forward(task.support_x, task.start, return_features=True)
        if not task.training or self.first_order_init:
            features = features.detach()  # no meta-graph through the prototypes
        weight, bias = prototype_head(features, task.support_y, self.ways)
        weight = weight.to(task.start["head.weight"].dtype)
        bias = bias.to(task.start["head.bias"].dtype)
        start = dict(task.start)
        if not task.vectorised:
            if weight.requires_grad:
                # the head now depends on the body's tensors; step from aliases of them, so the inner
                # gradient w.r.t. the body is the partial derivative (the head held fixed), as
                # torch.func.grad takes it under the vmap engine, and the meta-gradient still
                # reaches the body along both paths
                start = {n: t if n in HEAD else t.view_as(t) for n, t in start.items()}
            else:
                weight, bias = weight.requires_grad_(), bias.requires_grad_()
        task.start = {**start, "head.weight": weight, "head.bias": bias}
