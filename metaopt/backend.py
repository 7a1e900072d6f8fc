"""Functional forward over a user's model: the only place the loop touches ``higher``.

A backend runs ``model(x)`` with some parameters replaced by fast weights.  It is patched
once per model and re-bound per call, so per-task cost is one list of tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import higher
import torch
from torch import nn

from metaopt.errors import ConfigError, suggest

BN_POLICIES = ("transductive", "running")
"""``transductive``: BatchNorm always normalises with the statistics of the batch at hand
(support batch during adaptation, query batch for the outer loss) and the model's running
statistics are never read nor written.  ``running``: BatchNorm uses the model's running
statistics, frozen (eval-mode BN), e.g. for pretrained backbones.  In both, adaptation
never changes the model's buffers."""


class Backend(Protocol):
    """What the loop needs from a functional-model engine."""

    def prepare(self, training: bool) -> None:
        """Called at every batch start: (re)bind to the model, set train/eval modes."""

    def forward(self, x: torch.Tensor, params: dict[str, torch.Tensor], **kwargs: Any) -> Any:
        """``model(x, **kwargs)`` with the named parameters replaced by ``params``."""

    def release(self) -> None:
        """Called when a batch's forward passes are done (restore anything ``prepare`` changed)."""


def check_bn_policy(bn_policy: str) -> None:
    if bn_policy not in BN_POLICIES:
        raise ConfigError(
            f"bn_policy={bn_policy!r} is not known; use one of {BN_POLICIES}.{suggest(bn_policy, BN_POLICIES)}"
        )


def _set_modes(module: nn.Module, training: bool, bn_policy: str) -> None:
    module.train(training)
    for sub in module.modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            sub.train(bn_policy == "transductive")


def _float_leaves(output: Any) -> list[torch.Tensor]:
    if isinstance(output, dict):  # transformers' ModelOutput is an OrderedDict
        output = list(output.values())
    leaves = torch.utils._pytree.tree_leaves(output)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


@contextlib.contextmanager
def _exact_kernels() -> Iterator[None]:
    """No TF32 and deterministic cuDNN algorithms for a while (two forwards that run the same ops must
    agree to rounding, not to TF32's 1e-3, for the stale-read check); restored after."""
    cuda, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (cuda.allow_tf32, cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark)
    cuda.allow_tf32, cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark = False, False, True, False
    try:
        yield
    finally:
        cuda.allow_tf32, cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark = saved


class HigherBackend:
    """``higher.monkeypatch`` once; every call passes the full parameter list explicitly."""

    name = "higher"

    def __init__(self, model: nn.Module, bn_policy: str = "transductive") -> None:
        check_bn_policy(bn_policy)
        self.model = model
        self.bn_policy = bn_policy
        self._fmodel: Any = None
        self._identity: list[int] = []
        self._named: list[tuple[str, torch.Tensor]] = []
        self.patch_count = 0

    def _patch(self) -> None:
        # copy_initial_weights=False: the patched model must not own copies of θ, or the
        # meta-gradient would be cut.  We pass params explicitly on every call anyway.
        self._fmodel = higher.monkeypatch(self.model, copy_initial_weights=False, track_higher_grads=True)
        self._named = list(self.model.named_parameters())
        self._identity = [id(p) for _, p in self._named]
        self.patch_count += 1

    def prepare(self, training: bool) -> None:
        if self._fmodel is None or [id(p) for p in self.model.parameters()] != self._identity:
            self._patch()
        else:  # buffers may have moved device/dtype or been loaded from a checkpoint
            higher.patch.buffer_sync(self.model, self._fmodel)
        _set_modes(self._fmodel, training, self.bn_policy)

    def release(self) -> None:
        pass

    def stale_reads(self, x: torch.Tensor, names: list[str]) -> list[str]:
        """Adapted parameters that the patched copy does not hand to the model's forward.

        higher swaps a submodule's parameters for the fast weights only when that submodule's own
        forward runs, so a forward that reads ``self.norm.weight`` without calling ``self.norm``
        (``F.layer_norm(h, shape, self.norm.weight, ...)``, a weight tied by reading it) or before
        calling it gets the original (or the previous call's) tensor: the inner loop's update to it
        is lost without a word.  Found by one no-grad forward in eval mode with every adapted
        parameter moved (seeded noise), through higher and through ``torch.func.functional_call``,
        each from the same buffers and random state; when they differ, one parameter at a time
        names the culprits.  Buffers and modes are restored after.
        """
        named = dict(self.model.named_parameters())
        g = torch.Generator().manual_seed(0)
        moved = {}
        for n in names:
            p = named[n].detach()
            if p.is_floating_point():
                noise = torch.randn(p.shape, generator=g).to(p.device, p.dtype)
                moved[n] = p + 0.1 * (p.abs().mean() + 1e-2) * noise
        saved = {n: b.clone() for n, b in self.model.named_buffers()}
        modes = [(m, m.training) for m in self.model.modules()]
        if self._fmodel is None:
            self._patch()
        higher.patch.buffer_sync(self.model, self._fmodel)  # the copy's own statistics may have moved

        def restore() -> None:
            with torch.no_grad():
                for n, b in self.model.named_buffers():
                    b.copy_(saved[n])
            higher.patch.buffer_sync(self.model, self._fmodel)

        def seeded(run: Callable[[], Any]) -> Any:
            """``run`` from the same buffers and random state (a forward that draws or counts is not a stale read)."""
            restore()
            devices = [x.device] if x.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                torch.manual_seed(0)
                return run()

        def differs(params: dict[str, torch.Tensor]) -> bool:
            _set_modes(self._fmodel, False, "running")
            self.model.eval()
            full = {**named, **params}
            try:
                ours = seeded(lambda: self.forward(x, params))
                theirs = seeded(lambda: torch.func.functional_call(self.model, full, (x,), strict=False))
            except Exception:  # a module functional_call cannot reparametrise (a ScriptModule): no verdict
                return False
            # every floating-point tensor of the output (a tensor, a tuple, a dict or a transformers ModelOutput)
            pairs = [
                (a, b) for a, b in zip(_float_leaves(ours), _float_leaves(theirs), strict=False) if a.shape == b.shape
            ]
            for a, b in pairs:
                scale = float(b.abs().max()) if b.numel() else 0.0
                if not torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5 * max(scale, 1e-6)):
                    return True
            return False

        try:
            with _exact_kernels():
                if not moved or not differs(moved):
                    return []
                return [n for n in moved if differs({n: moved[n]})]
        finally:
            for module, mode in modes:
                module.training = mode
            restore()

    def forward(self, x: torch.Tensor, params: dict[str, torch.Tensor], **kwargs: Any) -> Any:
        if self._fmodel is None:
            self.prepare(self.model.training)
        full = [params.get(name, p) for name, p in self._named]
        try:
            return self._fmodel(x, params=full, **kwargs)
        finally:
            # higher appends every `params=` call to a history list when tracking grads;
            # clearing it keeps one patched model reusable without holding old graphs alive.
            self._fmodel._fast_params = None


def walk_module(model: nn.Module) -> tuple[list[nn.Module], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``list(model.modules())``, ``dict(model.named_parameters())`` and ``dict(model.named_buffers())``
    from one walk of the module tree instead of three (each of torch's walks goes through every module)."""
    modules: list[nn.Module] = []
    params: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    seen_params: set[torch.Tensor] = set()
    seen_buffers: set[torch.Tensor] = set()
    for prefix, module in model.named_modules():
        modules.append(module)
        dot = prefix + "." if prefix else ""
        for name, p in module._parameters.items():
            if p is not None and p not in seen_params:  # a tied tensor under its first name, as torch does
                seen_params.add(p)
                params[dot + name] = p
        for name, b in module._buffers.items():
            if b is not None and b not in seen_buffers:
                seen_buffers.add(b)
                buffers[dot + name] = b
    return modules, params, buffers


class TorchFuncBackend:
    """``torch.func.functional_call`` on the user's module itself: no patched copy at all.

    The model's train/eval modes are set for the batch and restored by ``release``; BatchNorm
    running statistics are read from and written to per-batch copies of the buffers, so
    adaptation never changes the model's buffers (same policies as :class:`HigherBackend`).
    """

    name = "torch.func"

    def __init__(self, model: nn.Module, bn_policy: str = "transductive") -> None:
        check_bn_policy(bn_policy)
        self.model = model
        self.bn_policy = bn_policy
        self._buffers: dict[str, torch.Tensor] = {}
        self._named: dict[str, torch.Tensor] = {}
        self._modes: list[tuple[nn.Module, bool]] = []
        #: the last _set_modes call: (training, modules, their flags before, their flags after)
        self._modes_memo: tuple[bool, list[nn.Module], list[bool], list[bool]] | None = None
        self._tied = True
        self._tied_for: tuple[int, int] | None = None

    def prepare(self, training: bool) -> None:
        modules, self._named, buffers = walk_module(self.model)
        if not self._modes:
            self._modes = [(m, m.training) for m in modules]
        self._set_modes(training)
        if self._modes_memo is None:  # a module's own train() ran: it may have changed what it holds
            _, self._named, buffers = walk_module(self.model)
        self._buffers = {n: b.clone() for n, b in buffers.items()}
        # functional_call's weight-tying pass walks every module on every call; run it only
        # when some parameter or buffer really is registered under two names
        if self._tied_for != (len(self._named), len(self._buffers)):  # counted once per model layout
            every = len(list(self.model.named_parameters(remove_duplicate=False)))
            every += len(list(self.model.named_buffers(remove_duplicate=False)))
            self._tied = every != len(self._named) + len(self._buffers)
            self._tied_for = (len(self._named), len(self._buffers))

    @property
    def named_parameters(self) -> dict[str, torch.Tensor]:
        """The model's named parameters, as read by the last ``prepare``."""
        return self._named

    def _set_modes(self, training: bool) -> None:
        """``_set_modes`` on the model; when the same modules hold the same flags as at the last call
        (every batch of a run) and none has its own ``train``, its result is set directly
        (``model.train`` walks and sets every module)."""
        modules = [m for m, _ in self._modes]
        before = [m.training for m in modules]
        memo = self._modes_memo
        if (
            memo is not None
            and memo[0] == training
            and memo[2] == before
            and len(memo[1]) == len(modules)
            and all(a is b for a, b in zip(memo[1], modules, strict=True))
        ):
            for module, flag in zip(modules, memo[3], strict=True):
                if module.training != flag:
                    module.training = flag
            return
        _set_modes(self.model, training, self.bn_policy)
        # a module with its own train() may decide by more than the flags: then it is called every time
        plain = all(type(m).train is nn.Module.train and "train" not in vars(m) for m in modules)
        self._modes_memo = (training, modules, before, [m.training for m in modules]) if plain else None

    def release(self) -> None:
        for module, mode in self._modes:
            if module.training != mode:  # nn.Module.__setattr__ is slow; most flags are unchanged
                module.training = mode
        self._modes = []

    def forward(self, x: torch.Tensor, params: dict[str, torch.Tensor], **kwargs: Any) -> Any:
        if not self._named:
            self.prepare(self.model.training)
        full = {**self._named, **params, **self._buffers}
        return torch.func.functional_call(self.model, full, (x,), kwargs, tie_weights=self._tied, strict=False)


BACKENDS = {"higher": HigherBackend, "torch.func": TorchFuncBackend}


def make_backend(name: str, model: nn.Module, bn_policy: str) -> HigherBackend | TorchFuncBackend:
    if name not in BACKENDS:
        raise ConfigError(f"backend={name!r} is not known; use one of {sorted(BACKENDS)}.{suggest(name, BACKENDS)}")
    return BACKENDS[name](model, bn_policy)
