"""Every registered plugin, alone and in every pair: builds, trains a step, round-trips state."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import class_tasks, regression_tasks
from torch import nn

from metaopt import HeadedModel, MetaLearner, PluginConflictError, create_plugin, list_plugins
from metaopt.models import mlp
from metaopt.registry import plugin_entry

NAMES = sorted(list_plugins())


def _setup(names):
    """A classifier on 3-way tasks when a plugin needs one (``classification_only``), else the sinusoid MLP."""
    torch.manual_seed(0)
    if any(getattr(plugin_entry(n).factory, "classification_only", False) for n in names):
        model = HeadedModel(nn.Sequential(nn.Linear(4, 16), nn.Tanh()), nn.Linear(16, 3))
        return model, F.cross_entropy, lambda: class_tasks(2, dtype=torch.float32)
    return mlp(hidden=(16, 16)), F.mse_loss, lambda: regression_tasks(2, dtype=torch.float32)


def _step(names):
    model, loss_fn, tasks = _setup(names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner = MetaLearner(model, [create_plugin(n) for n in names], inner_steps=2, inner_lr=0.01, loss_fn=loss_fn)
    opt = torch.optim.Adam(learner.parameters(), 1e-3)
    result = learner.backward(tasks())
    grads = [p.grad for p in learner.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert torch.isfinite(result.loss)
    opt.step()
    return learner, tasks


@pytest.mark.parametrize("name", NAMES)
def test_plugin_contract(name):
    learner, tasks = _step([name])
    state, pstate = learner.state_dict(), learner.plugin_state()
    model, loss_fn, _ = _setup([name])
    other = MetaLearner(model, [create_plugin(name)], inner_steps=2, loss_fn=loss_fn)
    other.load_state_dict(state)
    other.load_plugin_state(pstate)
    assert all(torch.equal(a, b) for a, b in zip(state.values(), other.state_dict().values()))
    assert learner.evaluate(tasks()).metrics["query_loss"] >= 0


@pytest.mark.parametrize("pair", list(itertools.combinations(NAMES, 2)), ids="+".join)
def test_every_pair_trains_or_conflicts_at_build(pair):
    try:
        _step(list(pair))
    except PluginConflictError as exc:
        assert pair[0] in str(exc) or pair[1] in str(exc)
