"""ANIL (Raghu et al., ICLR 2020, "Rapid learning or feature reuse?"): adapt only the head.

The inner loop updates the head's parameters; the body is meta-learned through the query
loss (its gradient flows through the adapted head, second order unless first order is asked).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from metaopt.errors import ConfigError
from metaopt.hookspecs import hookimpl


def head_prefixes(model: nn.Module) -> list[str]:
    """Parameter-name prefixes of a model's classifier: timm's ``get_classifier()``, else ``head``."""
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        classifier = get_classifier()
        if isinstance(classifier, nn.Module):
            for name, module in model.named_modules():
                if module is classifier and name:
                    return [name + "."]
    for attr in ("head", "classifier", "fc"):
        if isinstance(getattr(model, attr, None), nn.Module):
            return [attr + "."]
    return []


class ANIL:
    """ANIL: only the head (or the parameters named by ``prefixes``) is adapted per task."""

    name = "anil"
    vmap_safe = True  # runs under engine="vmap" (tests/test_engine.py, tests/plugins/test_combinations.py)
    incompatible_with = {
        "hypermaml": "HyperMAML already adapts only the head (with its own update); use one of them.",
        "reptile": "Reptile's meta-gradient covers only the adapted parameters and ignores the query loss, so with "
        "ANIL the body would never train; use fomaml for a first-order ANIL.",
    }

    def __init__(self, prefixes: str | Sequence[str] | None = None) -> None:
        if isinstance(prefixes, str):
            prefixes = [p for p in prefixes.split("+") if p]
        if prefixes is not None and not prefixes:
            raise ConfigError("prefixes is empty; name at least one parameter prefix (e.g. 'head.') or leave it unset.")
        self.prefixes = None if prefixes is None else list(prefixes)

    @hookimpl
    def adapted_params(self, learner, candidates: list[str]) -> list[str]:
        prefixes = self.prefixes if self.prefixes is not None else head_prefixes(learner.model)
        if not prefixes:
            raise ConfigError(
                f"anil could not find the head of {type(learner.model).__name__} (no get_classifier(), head, "
                "classifier or fc); name the adapted parameters, e.g. anil:prefixes=fc. (several: 'fc.+layer4.')."
            )
        chosen = [n for n in candidates if any(n.startswith(p) for p in prefixes)]
        if not chosen:
            raise ConfigError(
                f"anil: no trainable parameter starts with {prefixes}; trainable names begin with "
                f"{sorted({c.split('.')[0] + '.' for c in candidates})}."
            )
        return chosen
