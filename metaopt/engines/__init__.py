"""Engines: how the tasks of a meta-batch are executed (see docs/engines.md).

::

    MetaLearner.backward(tasks)         hooks, plugins, validation, the outer step
        -> engine = learner.engine_for(batch)            loop | vmap | compile   (auto decides per batch)
        -> engine.run(batch, learner.engine_context)     the learner's public pieces only
              -> run_task(task) for each task (loop) or inside torch.func.vmap (vmap)
        <- the mean meta-loss; per-task results on the batch

An engine gets an :class:`EngineContext`, never the learner; tasks and batches carry their hook
relay, backend and trajectory factory, and never call back into the learner.
"""

from metaopt.engines.base import ENGINES, Engine, EngineContext, check_engine, make_task, run_task
from metaopt.engines.choose import (
    auto_engine,
    choose_engine,
    compile_refusals,
    ragged,
    unvetted_plugins,
    vmap_refusals,
)
from metaopt.engines.compile import CompileEngine
from metaopt.engines.gate import exactness_gate
from metaopt.engines.loop import LoopEngine
from metaopt.engines.vmap import VmapBackend, VmapEngine

__all__ = [
    "CompileEngine",
    "ENGINES",
    "Engine",
    "EngineContext",
    "LoopEngine",
    "VmapBackend",
    "VmapEngine",
    "auto_engine",
    "check_engine",
    "exactness_gate",
    "choose_engine",
    "compile_refusals",
    "make_task",
    "ragged",
    "run_task",
    "unvetted_plugins",
    "vmap_refusals",
]
