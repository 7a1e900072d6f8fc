"""The plugin host: registers plugins, enforces composition rules, describes the result."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Generator, Sequence
from types import SimpleNamespace
from typing import Any

import pluggy
from torch.utils.checkpoint import _StopRecomputationError

from metaopt import hookspecs
from metaopt.builtin import BUILTIN_PREFIX, MAMLDefaults
from metaopt.errors import MetaOptError, PluginConflictError, PluginError, PluginHookError, suggest
from metaopt.task import Task

#: exceptions a hook lets through unchanged: metaopt's own, and the control-flow signal with
#: which torch.utils.checkpoint stops a recomputation early (memory="recompute" replays hooks)
PASS_THROUGH: tuple[type[BaseException], ...] = (MetaOptError, _StopRecomputationError)


def plugin_name(plugin: object) -> str:
    """A plugin's name: its ``name`` attribute, else its class name in lower case."""
    name = getattr(plugin, "name", None)
    if isinstance(name, str) and name:
        return name
    return type(plugin).__name__.lower()


def _validate(plugin: object, name: str) -> None:
    if inspect.isclass(plugin):
        raise PluginError(f"plugin {name!r} was passed as a class; pass an instance, e.g. {plugin.__name__}().")
    specs = set(hookspecs.HOOK_ORDER)
    for attr in dir(type(plugin)):
        member = getattr(type(plugin), attr, None)
        if callable(member) and hasattr(member, "metaopt_impl") and attr not in specs:
            raise PluginError(
                f"plugin {name!r} implements {attr!r}, which is not a metaopt hook."
                + suggest(attr, specs)
                + " The hooks are listed in docs/writing-plugins.md."
            )


def _hook_error(exc: Exception, plugin: str, hook: str, args: tuple[Any, ...]) -> PluginHookError:
    task = next((a.index for a in args if isinstance(a, Task)), None)
    where = f" (task {task})" if task is not None else ""
    return PluginHookError(
        f"plugin {plugin!r} raised in hook {hook!r}{where}: {type(exc).__name__}: {exc}",
        plugin=plugin,
        hook=hook,
        task=task,
    )


def _guard(function: Callable[..., Any], plugin: str, hook: str) -> Callable[..., Any]:
    """Wrap a hook implementation so a foreign exception names the plugin, hook and task.

    metaopt's own errors pass through unchanged (they already say what to do); so do
    ``BaseException``s such as ``KeyboardInterrupt``.  Wrapper hooks are generators, so the
    generator is proxied with ``yield from`` (``send``/``throw`` reach it unchanged).
    """
    if inspect.isgeneratorfunction(function):

        @functools.wraps(function)
        def guarded_gen(*args: Any) -> Generator[Any, Any, Any]:
            try:
                return (yield from function(*args))
            except PASS_THROUGH:
                raise
            except Exception as exc:
                raise _hook_error(exc, plugin, hook, args) from exc

        return guarded_gen

    @functools.wraps(function)
    def guarded(*args: Any) -> Any:
        try:
            return function(*args)
        except PASS_THROUGH:
            raise
        except Exception as exc:
            raise _hook_error(exc, plugin, hook, args) from exc

    return guarded


def direct_caller(caller: Any) -> Callable[..., Any]:
    """``caller`` (a pluggy hook caller), or, for a hook with no implementation or with one plain one
    (no wrapper, no keyword-only arguments, no spec defaults), a function that returns what pluggy's
    call returns, without its per-call bookkeeping: None or [] for no implementation; for one, the
    implementation's result (firstresult), or [result] / [] when it is None.  A missing argument
    still raises pluggy's error (the call is handed to ``caller``).  pluggy's call monitoring
    (``add_hookcall_monitoring``, ``enable_tracing``) does not see these calls."""
    spec = caller.spec
    impls = caller.get_hookimpls()
    if spec is None or spec.kwargdefaults or spec.opts.get("historic") or len(impls) > 1:
        return caller
    first = bool(spec.opts.get("firstresult"))
    if not impls:
        return (lambda **_: None) if first else (lambda **_: [])
    impl = impls[0]
    if impl.wrapper or impl.hookwrapper or impl.kwargnames:
        return caller
    function, names = impl.function, impl.argnames

    def call(**kwargs: Any) -> Any:
        try:
            args = [kwargs[name] for name in names]
        except KeyError:
            return caller(**kwargs)  # pluggy's HookCallError, naming the argument
        result = function(*args)
        return result if first else ([] if result is None else [result])

    return call


class PluginHost:
    """A pluggy manager holding the built-in defaults and the user's plugins, checked."""

    def __init__(self, plugins: Sequence[object], *, check_finite: bool = True) -> None:
        self.pm = pluggy.PluginManager("metaopt")
        self.pm.add_hookspecs(hookspecs)
        self.builtins: list[object] = [MAMLDefaults()]
        self.finite_check = None
        if check_finite:
            from metaopt.numerics import FiniteCheck

            self.finite_check = FiniteCheck()
            self.builtins.append(self.finite_check)
        for builtin in self.builtins:
            self.pm.register(builtin, name=plugin_name(builtin))
        self.plugins = list(plugins)
        self.names = [plugin_name(p) for p in self.plugins]
        seen: set[str] = set()
        for plugin, name in zip(self.plugins, self.names, strict=True):
            if name in seen:
                raise PluginConflictError(
                    f"plugin {name!r} is listed twice; give each instance a distinct `name` or list it once."
                )
            seen.add(name)
            _validate(plugin, name)
        # pluggy calls later registrations first, so register in reverse: the first plugin
        # the user listed becomes the outermost wrapper.
        for plugin, name in reversed(list(zip(self.plugins, self.names, strict=True))):
            try:
                self.pm.register(plugin, name=name)
            except pluggy.PluginValidationError as exc:
                raise PluginError(f"plugin {name!r} does not fit the hook specs: {exc}") from exc
        self._check_replace_conflicts()
        self._check_declared_incompatibilities()
        for hook_name in hookspecs.HOOK_ORDER:
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                impl.function = _guard(impl.function, impl.plugin_name, hook_name)

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def hook_without(self, plugin: object | None) -> Any:
        """A relay like :attr:`hook` whose calls skip ``plugin``'s implementations, for the engines' hot
        path (the vmap body): see :func:`direct_caller`.  The plugins are fixed once the host is built."""
        skip = [] if plugin is None else [plugin]
        return SimpleNamespace(
            **{name: direct_caller(self.pm.subset_hook_caller(name, skip)) for name in vars(self.pm.hook)}
        )

    def replaced(self, hook_name: str) -> bool:
        """True when a registered (non-built-in) plugin implements ``hook_name`` itself."""
        return bool(self.owners(hook_name))

    def owners(self, hook_name: str) -> list[str]:
        """The registered (non-built-in) plugins that implement ``hook_name`` themselves, in call order."""
        impls = getattr(self.pm.hook, hook_name).get_hookimpls()
        return [
            impl.plugin_name
            for impl in reversed(impls)  # call order
            if not (impl.hookwrapper or impl.wrapper) and not impl.plugin_name.startswith(BUILTIN_PREFIX)
        ]

    def _check_replace_conflicts(self) -> None:
        for hook_name in hookspecs.HOOK_ORDER:
            if hookspecs.hook_mode(hook_name) != "replace":
                continue
            owners = self.owners(hook_name)
            if len(owners) > 1:
                raise PluginConflictError(
                    f"plugins {owners[0]!r} and {owners[1]!r} both replace hook {hook_name!r}; "
                    "only one plugin may own a replace hook. Drop one of them, or turn one into "
                    "a wrapper (@hookimpl(wrapper=True))."
                )

    def _check_declared_incompatibilities(self) -> None:
        active = set(self.names)
        for plugin, name in zip(self.plugins, self.names, strict=True):
            for other, advice in dict(getattr(plugin, "incompatible_with", {}) or {}).items():
                if other in active:
                    raise PluginConflictError(f"plugins {name!r} and {other!r} cannot be combined: {advice}")

    def plugin(self, name: str) -> object | None:
        return self.pm.get_plugin(name)

    def describe(self) -> str:
        """Per hook, in firing order, the plugins that implement it in the order they run."""
        lines = []
        for hook_name in hookspecs.HOOK_ORDER:
            impls = list(reversed(getattr(self.pm.hook, hook_name).get_hookimpls()))
            if not impls:
                continue
            parts = []
            for impl in impls:
                tag = " [wrap]" if (impl.hookwrapper or impl.wrapper) else ""
                parts.append(impl.plugin_name + tag)
            lines.append(f"{hook_name:<18} ({hookspecs.hook_mode(hook_name)}): " + " -> ".join(parts))
        return "\n".join(lines)
