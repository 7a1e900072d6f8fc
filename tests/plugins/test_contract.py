"""Every registered plugin, alone and in every pair: builds, trains a step, round-trips state."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import regression_tasks

from metaopt import MetaLearner, PluginConflictError, create_plugin, list_plugins
from metaopt.models import mlp

NAMES = sorted(list_plugins())


def _step(names):
    torch.manual_seed(0)
    model = mlp(hidden=(16, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner = MetaLearner(
            model, [create_plugin(n) for n in names], inner_steps=2, inner_lr=0.01, loss_fn=F.mse_loss
        )
    opt = torch.optim.Adam(learner.parameters(), 1e-3)
    result = learner.backward(regression_tasks(2, dtype=torch.float32))
    grads = [p.grad for p in learner.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert torch.isfinite(result.loss)
    opt.step()
    return learner


@pytest.mark.parametrize("name", NAMES)
def test_plugin_contract(name):
    learner = _step([name])
    state, pstate = learner.state_dict(), learner.plugin_state()
    other = MetaLearner(mlp(hidden=(16, 16)), [create_plugin(name)], inner_steps=2, loss_fn=F.mse_loss)
    other.load_state_dict(state)
    other.load_plugin_state(pstate)
    assert all(torch.equal(a, b) for a, b in zip(state.values(), other.state_dict().values()))
    assert learner.evaluate(regression_tasks(2, dtype=torch.float32)).metrics["query_loss"] >= 0


@pytest.mark.parametrize("pair", list(itertools.combinations(NAMES, 2)), ids="+".join)
def test_every_pair_trains_or_conflicts_at_build(pair):
    try:
        _step(list(pair))
    except PluginConflictError as exc:
        assert pair[0] in str(exc) or pair[1] in str(exc)
