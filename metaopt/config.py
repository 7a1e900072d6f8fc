"""Training configuration: defaults, files (YAML/JSON), validation with suggestions."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metaopt.errors import ConfigError, suggest

DEVICES = ("auto", "cpu", "cuda")
#: keys ``metaopt train --resume`` may change; every other key must equal the run's saved config
RESUME_SAFE_KEYS = (
    "iterations",
    "eval_every",
    "eval_tasks",
    "checkpoint_every",
    "keep_checkpoints",
    "log_with",
    "on_nonfinite",
    "device",
    "keep_best",
    "workers",
    "engine",
    "task_chunk",
    "keep_freed_memory",
    "memory",
)


def _scalar_types(hint: Any) -> list[type]:
    """The scalar types a field accepts (``float | None`` -> [float])."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return [a for a in args if a in (bool, int, float, str)]


def _finite(key: str, value: Any, source: str) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{source} key {key!r} must be a finite number; got {value!r}.")
    return value


def coerce(key: str, value: Any, hint: Any, source: str = "config") -> Any:
    """``value`` as the declared type: YAML reads ``1e-2`` as a string, a flag may give ``"3"``.

    Strings become numbers or booleans where the field is numeric or boolean; ints become
    floats for float fields; numbers must be finite (no NaN, inf or 1e400).  A list field takes a
    list (a bare string is not read letter by letter), a mapping field a mapping with string keys.
    Anything else that does not fit is a :class:`ConfigError` naming the key and the value.
    """
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in args or hint is Any:
            return None
        raise ConfigError(f"{source} key {key!r} needs a value; got null/None.")
    containers = [a for a in args if typing.get_origin(a) in (list, dict)]
    if containers:
        return _coerce_container(key, value, containers[0], source)
    kinds = _scalar_types(hint)
    if not kinds or any(type(value) is k for k in kinds):
        return _finite(key, value, source)
    if bool in kinds:
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.strip().lower() in ("true", "yes", "on", "1")
    elif isinstance(value, str) or (isinstance(value, int | float) and not isinstance(value, bool)):
        for kind in (int, float):
            if kind in kinds:
                try:
                    number = float(value) if isinstance(value, str) else value
                    if kind is int and float(number) != int(float(number)):
                        continue
                    converted = kind(number)
                except (TypeError, ValueError, OverflowError):
                    continue
                return _finite(key, converted, source)
    expected = " or ".join(k.__name__ for k in kinds)
    raise ConfigError(f"{source} key {key!r} must be {expected}; got {value!r} ({type(value).__name__}).")


def _coerce_container(key: str, value: Any, hint: Any, source: str) -> Any:
    if typing.get_origin(hint) is list:
        if not isinstance(value, list | tuple):
            advice = f" Did you mean [{value!r}]?" if isinstance(value, str | int | float) else ""
            raise ConfigError(f"{source} key {key!r} must be a list; got {value!r} ({type(value).__name__}).{advice}")
        (item,) = typing.get_args(hint) or (Any,)
        return [coerce(f"{key}[{i}]", v, item, source) for i, v in enumerate(value)]
    if not isinstance(value, dict):
        raise ConfigError(
            f"{source} key {key!r} must be a mapping (a JSON object / YAML mapping); got {value!r} "
            f"({type(value).__name__})."
        )
    _, item = typing.get_args(hint) or (str, Any)
    for k in value:
        if not isinstance(k, str):
            raise ConfigError(f"{source} key {key!r} must have string keys; got {k!r} ({type(k).__name__}).")
    return {k: coerce(f"{key}[{k!r}]", v, item, source) for k, v in value.items()}


DATA_SYNTAX = (
    "glyphs (built-in synthetic, no download) | sinusoid | omniglot:PATH (an official images_background*.zip "
    "or its folder) | folder:PATH (one sub-folder per class, read lazily) | csv:FILE[@ROOT] (filename,label rows, "
    "images in ROOT or images/ beside FILE; test split: the sibling test.csv)"
)
#: --help text of every config key (flags and config files share the names)
FIELD_HELP: dict[str, str] = {
    "data": "task source: " + DATA_SYNTAX,
    "ways": "classes per task",
    "shots": "support examples per class (sinusoid: support points)",
    "query": "query examples per class (sinusoid: query points)",
    "image_size": "images are resized to this many pixels a side",
    "channels": "input channels, 1 or 3 (default: detected; folder: 3 if the images have colour, else 1)",
    "normalize": "normalise images with the model's pretrained mean/std (default: on with --pretrained-path)",
    "rotations": "add each training class rotated by 90/180/270 degrees as new classes (image sources)",
    "augment": "small random affine distortions of training images (folder: and csv: data)",
    "workers": "DataLoader worker processes decoding folder:/csv: tasks (the same tasks for any number)",
    "within_alphabet": "Omniglot: draw all classes of a task from one alphabet (as the Lake one-shot runs do)",
    "test_alphabets": "Omniglot alphabets held out for testing (repeatable)",
    "model": "auto (conv4 for images, the MLP for sinusoid), conv4, conv4_3pool (the last block keeps its 3x3 map), mlp, mlp_paper (the MLP initialised as the MAML authors' code: truncated normal std 0.01, zero biases), or any timm model name",
    "pretrained_path": "a local state_dict file for a timm model (nothing is downloaded)",
    "plugins": "algorithm plugin, NAME or NAME:key=value,... (see `metaopt plugins`)",
    "inner_steps": "inner gradient steps per task during training",
    "inner_lr": "inner learning rate (default: 0.4 for image data, the MAML Omniglot value; 0.01 for sinusoid)",
    "eval_inner_steps": "inner steps at evaluation (default: inner_steps)",
    "first_order": "drop second-order terms (FOMAML-style meta-gradient)",
    "inner_optimizer": "differentiable inner optimizer",
    "bn_policy": "BatchNorm during adaptation: batch statistics (transductive) or running statistics",
    "backend": "functional engine of the inner loop (loop engine)",
    "engine": "loop: task by task; vmap: every task of a meta-batch at once (torch.func.vmap, same gradients); "
    "compile: vmap under torch.compile, checked against float64 on the first batch before it is trusted; "
    "auto (the CLI's default): vmap for models without convolutions, else loop (docs/engines.md)",
    "task_chunk": "vmap engine: tasks per vmap call (unset: the whole meta-batch); smaller holds less memory",
    "memory": "keep: every inner step's graph until the outer backward; recompute: only the parameters after each "
    "step, each step's graph recomputed in the outer backward (the same second-order meta-gradient, memory flat "
    "in inner_steps, about one extra forward and backward per step; loop engine)",
    "keep_freed_memory": "CPU runs on Linux/glibc: keep freed memory in the process instead of returning it to the "
    "OS after every task (fewer page faults, faster loop engine; metaopt.allocator)",
    "meta_batch": "tasks per meta-iteration",
    "iterations": "meta-iterations to train (a resumed run may raise it)",
    "meta_lr": "outer learning rate",
    "outer_optimizer": "outer (meta) optimizer: adam, sgd, normalized_sgd, or any timm optimizer (adamw, lamb, ...)",
    "outer_optimizer_kwargs": "extra outer optimizer options, a JSON object",
    "param_group_lr": "learning rates by meta-parameter name prefix, a JSON object, e.g. "
    '{"plugin_modules.hypernet.": 1e-4}',
    "lr_schedule": "outer learning-rate schedule through timm's scheduler factory (one step per iteration)",
    "warmup_iters": "linear warm-up iterations of the schedule",
    "keep_best": "with eval_every: also keep RUN/best.pt, the checkpoint of the best periodic eval of this "
    "metric (accuracy: highest; mse, query_loss: lowest)",
    "seed": "seeds torch, random and numpy; tasks are drawn from it",
    "precision": "mixed precision through accelerate (fp16 is refused: inner gradients are not loss-scaled)",
    "device": "auto (accelerate's choice), cpu, or cuda (refused when torch sees no CUDA device)",
    "eval_every": "evaluate on test tasks every N iterations (0: never during training)",
    "eval_tasks": "test tasks per periodic evaluation",
    "checkpoint_every": "write a checkpoint every N iterations (0: only at the end)",
    "keep_checkpoints": "how many recent checkpoints to keep",
    "clip_grad_norm": "clip the meta-gradient to this global norm (unset: no clipping)",
    "on_nonfinite": "a NaN/inf loss or gradient: raise (stop with the last good checkpoint named) or skip the batch",
    "log_with": "accelerate tracker, e.g. tensorboard (repeatable)",
}
FIELD_CHOICES: dict[str, tuple[str, ...]] = {
    "inner_optimizer": ("sgd", "adam", "higher_adam", "rmsprop", "adagrad"),
    "bn_policy": ("transductive", "running"),
    "backend": ("higher", "torch.func"),
    "engine": ("loop", "vmap", "compile", "auto"),
    "memory": ("keep", "recompute"),
    "lr_schedule": ("none", "cosine", "tanh", "step", "multistep", "poly"),
    "keep_best": ("accuracy", "mse", "query_loss"),
    "precision": ("no", "bf16", "fp16"),
    "device": DEVICES,
    "on_nonfinite": ("raise", "skip"),
}
DEFAULT_INNER_LR = {"regression": 0.01, "images": 0.4}
#: the largest meta-batch of float32 task inputs a config may ask for (3 channels counted)
MAX_BATCH_BYTES = 4 * 2**30


@dataclass
class TrainConfig:
    """Everything ``metaopt train`` needs; every field is also a CLI flag."""

    data: str = "glyphs"
    ways: int = 5
    shots: int = 1
    query: int = 15
    image_size: int = 28
    channels: int | None = None  # None: detected (folder: RGB if the images have colour; else 1)
    normalize: bool | None = None  # None: with pretrained weights
    rotations: bool = False
    augment: bool = False
    workers: int = 0
    within_alphabet: bool = False
    test_alphabets: list[str] | None = None
    model: str = "auto"
    pretrained_path: str | None = None
    plugins: list[Any] = field(default_factory=list)
    inner_steps: int = 1
    inner_lr: float | None = None  # resolved from the data source (see DEFAULT_INNER_LR)
    eval_inner_steps: int | None = None
    first_order: bool = False
    inner_optimizer: str = "sgd"
    bn_policy: str = "transductive"
    backend: str = "higher"
    engine: str = "auto"
    task_chunk: int | None = None
    memory: str = "keep"
    keep_freed_memory: bool = True
    meta_batch: int = 4
    iterations: int = 300
    meta_lr: float = 1e-3
    outer_optimizer: str = "adam"
    outer_optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    param_group_lr: dict[str, float] = field(default_factory=dict)
    lr_schedule: str = "none"
    warmup_iters: int = 0
    keep_best: str | None = None
    seed: int = 0
    precision: str = "no"
    device: str = "auto"
    eval_every: int = 0
    eval_tasks: int = 100
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    clip_grad_norm: float | None = None
    on_nonfinite: str = "raise"
    log_with: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.inner_lr is None:  # the Omniglot value diverges on sinusoid (MSE ~1800 after 20 iterations)
            self.inner_lr = DEFAULT_INNER_LR["regression" if self.regression else "images"]

    @property
    def regression(self) -> bool:
        return self.data.split(":")[0] == "sinusoid"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        names = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in names:
                raise ConfigError(f"unknown {source} key {key!r}.{suggest(key, names)}")
        hints = typing.get_type_hints(cls)
        values = {k: coerce(k, v, hints[k], source) for k, v in values.items()}
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        positive = {
            "ways": self.ways,
            "shots": self.shots,
            "query": self.query,
            "meta_batch": self.meta_batch,
            "image_size": self.image_size,
            "eval_tasks": self.eval_tasks,
        }
        for key, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key}={value!r} must be an integer >= 1.")
        if self.iterations < 0 or self.inner_steps < 0:
            raise ConfigError(f"iterations={self.iterations} and inner_steps={self.inner_steps} must be >= 0.")
        if self.inner_lr <= 0 or self.meta_lr <= 0:
            raise ConfigError(f"inner_lr={self.inner_lr} and meta_lr={self.meta_lr} must be > 0.")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ConfigError(f"clip_grad_norm={self.clip_grad_norm!r} must be > 0, or left unset for no clipping.")
        if self.channels not in (None, 1, 3):
            raise ConfigError(f"channels={self.channels!r} must be 1 or 3 (or unset: detected from the data).")
        if self.keep_best is not None and not self.eval_every:
            raise ConfigError(f"keep_best={self.keep_best!r} needs periodic evaluation; set eval_every (e.g. 100).")
        if self.workers < 0:
            raise ConfigError(f"workers={self.workers} must be >= 0 (0: decode tasks in the training process).")
        if self.warmup_iters < 0:
            raise ConfigError(f"warmup_iters={self.warmup_iters} must be >= 0.")
        if self.device not in DEVICES:
            raise ConfigError(f"device={self.device!r} must be one of {DEVICES}.{suggest(self.device, DEVICES)}")
        if self.on_nonfinite not in ("raise", "skip"):
            raise ConfigError(f"on_nonfinite={self.on_nonfinite!r} must be 'raise' or 'skip'.")
        if self.keep_checkpoints < 1 or self.checkpoint_every < 0:
            raise ConfigError(
                f"keep_checkpoints={self.keep_checkpoints} must be >= 1 and checkpoint_every="
                f"{self.checkpoint_every} >= 0 (0: only at the end)."
            )
        self._validate_more()

    def _validate_more(self) -> None:
        """Ranges, sizes and combinations (each message names the value and the fix)."""
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed={self.seed} must be an integer in [0, 2**63).")
        if self.eval_every < 0:
            raise ConfigError(f"eval_every={self.eval_every} must be >= 0 (0: no evaluation during training).")
        if self.eval_inner_steps is not None and self.eval_inner_steps < 0:
            raise ConfigError(f"eval_inner_steps={self.eval_inner_steps} must be >= 0 (or unset: inner_steps).")
        if self.task_chunk is not None and self.task_chunk < 1:
            raise ConfigError(f"task_chunk={self.task_chunk} must be >= 1 (or unset: the whole meta-batch).")
        kind = self.data.split(":", 1)[0]
        if self.test_alphabets is not None and kind != "omniglot":
            raise ConfigError(
                f"test_alphabets={self.test_alphabets} applies to omniglot: data only; data={self.data!r} has no "
                "alphabets. Remove it."
            )
        if self.within_alphabet and kind != "omniglot":
            raise ConfigError(f"within_alphabet applies to omniglot: data only; data={self.data!r}.")
        from metaopt.models import REGRESSION_MODELS

        if self.model in REGRESSION_MODELS and not self.regression:
            raise ConfigError(
                f"model={self.model!r} is the sinusoid regression MLP (one input); data={self.data!r} gives images. Use "
                "model=auto (conv4), conv4, or a timm name, or data=sinusoid."
            )
        if self.regression and self.model in ("conv4", "conv4_3pool"):
            raise ConfigError(
                f"data=sinusoid trains the MLP; model={self.model!r} takes images. Use model=auto or mlp."
            )
        if self.pretrained_path is not None:
            from metaopt.models import list_models

            if self.model in ("auto", *list_models()):
                raise ConfigError(
                    f"pretrained_path={self.pretrained_path!r} loads timm weights; model={self.model!r} is not a timm "
                    "model. Give a timm name (e.g. --model resnet10t) or drop --pretrained-path."
                )
            if not Path(self.pretrained_path).is_file():
                raise ConfigError(f"pretrained_path={self.pretrained_path!r} does not exist (or is not a file).")
        smallest = {"auto": 16, "conv4": 16, "conv4_3pool": 8}.get(self.model)
        if not self.regression and smallest and self.image_size < smallest:
            raise ConfigError(
                f"image_size={self.image_size} is too small for {self.model} (its max-pools need >= {smallest} pixels "
                f"a side); use image_size >= {smallest}."
            )
        if not self.regression:
            task_bytes = self.meta_batch * self.ways * (self.shots + self.query) * 3 * self.image_size**2 * 4
            if task_bytes > MAX_BATCH_BYTES:
                raise ConfigError(
                    f"a meta-batch of {self.meta_batch} tasks of {self.ways} ways x ({self.shots} shots + {self.query} "
                    f"query) images of {self.image_size}x{self.image_size} px holds up to {task_bytes / 2**30:.1f} GiB "
                    f"of float32 input, over the {MAX_BATCH_BYTES // 2**30} GiB bound; lower shots, query, "
                    "image_size or meta_batch."
                )
        elif self.shots + self.query > 100_000:
            raise ConfigError(
                f"shots + query = {self.shots + self.query} sinusoid points per task; use at most 100000."
            )
        if "lr" in self.outer_optimizer_kwargs:
            raise ConfigError(
                f"outer_optimizer_kwargs={self.outer_optimizer_kwargs} sets lr; the outer learning rate is meta_lr "
                "(--meta-lr). Remove lr from the kwargs."
            )
        for prefix, lr in self.param_group_lr.items():
            if not lr > 0:
                raise ConfigError(f"param_group_lr[{prefix!r}]={lr!r} must be a learning rate > 0.")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A config file's settings (see :mod:`metaopt.configfile`)."""
    from metaopt.configfile import load_config_file as load

    return load(path)


def parse_plugin_arg(text: str) -> dict[str, Any]:
    """``name`` or ``name:key=value,key=value`` (values parsed as YAML scalars)."""
    from metaopt.configfile import load_yaml

    name, _, rest = text.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"plugin option {item!r} in {text!r} must look like key=value.")
        options[key.strip()] = load_yaml(value, f"plugin option {item!r} in {text!r}")
    return {"name": name.strip(), **options}


def plugin_specs(plugins: list[Any]) -> list[tuple[str, dict[str, Any]]]:
    specs = []
    for item in plugins:
        if isinstance(item, str):
            item = parse_plugin_arg(item)
        if not isinstance(item, dict) or "name" not in item:
            raise ConfigError(f"plugin entry {item!r} must be a name or a mapping with a 'name' key.")
        options = {k: v for k, v in item.items() if k != "name"}
        specs.append((item["name"], options))
    return specs
