"""The algorithm plugins shipped with metaopt (importable as ``metaopt.plugins``)."""

from metaopt.plugins.anil import ANIL
from metaopt.plugins.first_order import FOMAML, ConvergentFO, Reptile
from metaopt.plugins.hypermaml import HyperMAML
from metaopt.plugins.maml_pp import MAMLPlusPlus
from metaopt.plugins.meta_sgd import MetaSGD
from metaopt.plugins.proto_head import ProtoHead
from metaopt.plugins.sharp_maml import SharpMAML
from metaopt.plugins.shot import SHOT
from metaopt.registry import register_plugin

register_plugin("fomaml", FOMAML)
register_plugin("reptile", Reptile)
register_plugin("convergent_fo", ConvergentFO)
register_plugin("shot", SHOT)
register_plugin("sharp_maml", SharpMAML)
register_plugin("hypermaml", HyperMAML)
register_plugin("anil", ANIL)
register_plugin("meta_sgd", MetaSGD)
register_plugin("maml_pp", MAMLPlusPlus)
register_plugin("proto_head", ProtoHead)

__all__ = [
    "ANIL",
    "FOMAML",
    "SHOT",
    "ConvergentFO",
    "HyperMAML",
    "MAMLPlusPlus",
    "MetaSGD",
    "ProtoHead",
    "Reptile",
    "SharpMAML",
]
