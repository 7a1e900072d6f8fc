"""Every pair of built-in plugins: refused when the learner is built, or equal to its float64 reference."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from conftest import class_tasks
from reference import combo_meta_grad
from torch import nn

from metaopt import HeadedModel, MetaLearner, PluginConflictError
from metaopt.plugins import ANIL, FOMAML, SHOT, ConvergentFO, HyperMAML, MAMLPlusPlus, MetaSGD, Reptile, SharpMAML

STEPS, LR, RHO, SHOT_WEIGHT = 2, 0.3, 0.05, 0.5

#: name -> (plugin factory, reference options)
ENTRIES = {
    "fomaml": (FOMAML, {"query_second_order": False, "shot_second_order": False}),
    "reptile": (Reptile, {"reptile": True, "shot_second_order": False}),
    "convergent_fo": (lambda: ConvergentFO(delta=1e-4), {"shot_second_order": False}),
    "shot": (lambda: SHOT(weight=SHOT_WEIGHT), {"shot_weight": SHOT_WEIGHT}),
    "sharp_inner": (lambda: SharpMAML(rho_inner=RHO), {"rho_inner": RHO}),
    "sharp_outer": (lambda: SharpMAML(rho_outer=RHO), {"rho_outer": RHO}),
    "sharp_both": (lambda: SharpMAML(rho_inner=RHO, rho_outer=RHO), {"rho_inner": RHO, "rho_outer": RHO}),
    "hypermaml": (lambda: HyperMAML(hidden=8, layers=2), {"hyper": True}),
    "anil": (ANIL, {"adapted": ["head.weight", "head.bias"]}),
    "meta_sgd": (MetaSGD, {"learned": "meta_sgd_lr"}),
    "maml_pp": (lambda: MAMLPlusPlus(msl_iters=10), {"learned": "maml_pp_lr", "per_step": True}),
}

REFUSED = {
    frozenset(pair)
    for pair in [
        ("fomaml", "reptile"),
        ("fomaml", "convergent_fo"),
        ("reptile", "convergent_fo"),
        ("reptile", "hypermaml"),
        ("convergent_fo", "hypermaml"),
        ("convergent_fo", "sharp_inner"),
        ("convergent_fo", "sharp_both"),
        ("shot", "hypermaml"),
        ("sharp_inner", "hypermaml"),
        ("sharp_both", "hypermaml"),
        ("anil", "hypermaml"),
        ("anil", "reptile"),
        ("meta_sgd", "maml_pp"),
        *[(a, b) for a in ("meta_sgd", "maml_pp") for b in ("reptile", "convergent_fo", "hypermaml")],
    ]
}

PAIRS = [p for p in itertools.combinations(ENTRIES, 2) if not all(n.startswith("sharp") for n in p)]


def _model():
    torch.manual_seed(0)
    return HeadedModel(nn.Sequential(nn.Linear(4, 6), nn.Tanh()), nn.Linear(6, 3)).double()


def _build(pair, engine="loop"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SHOT with a first-order learner warns
        return MetaLearner(_model(), [ENTRIES[n][0]() for n in pair], inner_steps=STEPS, inner_lr=LR, engine=engine)


@pytest.mark.parametrize("engine", ["loop", "vmap"])
@pytest.mark.parametrize("pair", PAIRS, ids="+".join)
def test_pair_is_refused_at_build_or_matches_its_reference(pair, engine):
    if frozenset(pair) in REFUSED:
        with pytest.raises(PluginConflictError) as info:
            _build(pair, engine)
        names = {"sharp_inner": "sharp_maml", "sharp_both": "sharp_maml"}
        assert all(names.get(n, n) in str(info.value) for n in pair), str(info.value)
        return
    learner = _build(pair, engine)
    options = {}
    for name in pair:
        options.update(ENTRIES[name][1])
    if options.pop("hyper", False):
        hypernet = learner.plugin_modules["hypernet"]
        with torch.no_grad():  # a hypernetwork that really changes the head (its last layer starts at 0)
            for p in hypernet.parameters():
                p.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
        options["hypernet"] = hypernet
    module = options.pop("learned", None)
    if module is not None:  # learned inner rates that differ per entry (and per step)
        rates = learner.plugin_modules[module]
        with torch.no_grad():
            for p in rates.parameters():
                p.uniform_(0.1, 0.5, generator=torch.Generator().manual_seed(p.numel()))
        options["learned_lrs"] = {k.replace("__", "."): t for k, t in rates.items()}
    plugin = learner.get_plugin("maml_pp")
    if plugin is not None:
        plugin.iteration = 3  # 30% into the multi-step-loss annealing
        options["msl_weights"] = plugin.msl_weights(STEPS)
        assert 0 < options["msl_weights"][0] < options["msl_weights"][1] < 1
    tasks = class_tasks()
    expected, expected_extra = combo_meta_grad(learner.model, tasks, STEPS, LR, **options)
    learner.backward(tasks)
    got = torch.cat([p.grad.flatten() for p in learner.model.parameters()])
    ref = torch.cat([expected[n].flatten() for n, _ in learner.model.named_parameters()])
    extra = (
        {"hyper." + n: p for n, p in learner.plugin_modules["hypernet"].named_parameters()}
        if "hypernet" in options
        else {}
    )
    extra.update({"lr." + n: t for n, t in options.get("learned_lrs", {}).items()})
    assert sorted(extra) == sorted(expected_extra)
    got = torch.cat([got, *[extra[n].grad.flatten() for n in expected_extra]])
    ref = torch.cat([ref, *[g.flatten() for g in expected_extra.values()]])
    # convergent_fo is a finite-difference estimate of the exact value (error O(delta^2))
    tolerance = 1e-6 if "convergent_fo" in pair else 1e-10
    assert ref.norm() > 0 and ((got - ref).norm() / ref.norm()).item() < tolerance
