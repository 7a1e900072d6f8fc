"""Accuracy contenders, registered by name: the CLI flags that turn MAML into each algorithm.

The accuracy and seeds runners (``accuracy.py``, ``seeds.py``) train every registered name through
``metaopt train``; ``{warm}`` in a flag becomes a tenth of the run's iterations.  Adding one::

    ALGORITHMS.register("shot_0.5", ["--plugin", "shot:weight=0.5"])
"""

from __future__ import annotations

from registry import Registry

ALGORITHMS: Registry[list[str]] = Registry("algorithm")
for _name, _flags in {
    "maml": [],
    "fomaml": ["--plugin", "fomaml"],
    "reptile": ["--plugin", "reptile"],
    "convergent_fo": ["--plugin", "convergent_fo", "--outer-optimizer", "normalized_sgd", "--meta-lr", "0.01"],
    "shot": ["--plugin", "shot"],
    "sharp_inner": ["--plugin", "sharp_maml:rho_inner=0.05"],
    "sharp_outer": ["--plugin", "sharp_maml:rho_inner=0,rho_outer=0.05"],
    "sharp_both": ["--plugin", "sharp_maml:rho_inner=0.05,rho_outer=0.05"],
    "shot+sharp_both": ["--plugin", "shot", "--plugin", "sharp_maml:rho_inner=0.05,rho_outer=0.05"],
    "hypermaml": ["--plugin", "hypermaml:warmup_iters={warm},blend_iters={warm}"],
    "anil": ["--plugin", "anil"],
    "meta_sgd": ["--plugin", "meta_sgd"],
    "maml_pp": ["--plugin", "maml_pp:msl_iters={warm},first_order_iters={warm}"],
    "proto_head": ["--plugin", "proto_head"],
}.items():
    ALGORITHMS.register(_name, _flags)


def algorithm_flags(name: str, iterations: int) -> list[str]:
    warm = max(1, iterations // 10)
    return [flag.format(warm=warm) for flag in ALGORITHMS.get(name)]
