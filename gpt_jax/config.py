"""Configs: frozen dataclasses loaded from `configs/*.toml` plus `--key=value` overrides.

A config file is flat TOML (nanoGPT's key names). Each key belongs to exactly one of `ModelConfig` or
`TrainConfig`; `load` routes it there, converts `--key=value` strings to the field's type, and raises
`ConfigError` (one line: the problem and the fix) for unknown keys, wrong types and invalid values.
"""

import dataclasses
import difflib
import tomllib
import types
import typing
from pathlib import Path

from gpt_jax.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent


def _field(default, help: str):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """GPT-2 architecture hyper-parameters (nanoGPT's names and meanings)."""

    vocab_size: int | None = _field(None, "vocabulary size; unset: taken from the tokenizer")
    block_size: int = _field(256, "context length T")
    n_layer: int = _field(6, "number of transformer blocks L")
    n_head: int = _field(6, "attention heads H per block")
    n_embd: int = _field(384, "model width D (divisible by n_head)")
    dropout: float = _field(0.2, "dropout rate in [0, 1) (training only)")
    bias: bool = _field(False, "biases in linear layers and LayerNorms")

    def __post_init__(self):
        for name in ("block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}; set --{name}=<a positive integer>")
        if self.vocab_size is not None and self.vocab_size <= 0:
            raise ConfigError(f"vocab_size must be positive, got {self.vocab_size}; leave it unset to use the tokenizer's")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"try n_head={_closest_divisor(self.n_embd, self.n_head)} or n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}; try --dropout=0.0")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training-run settings (nanoGPT's names where the meaning is the same)."""

    out_dir: str = _field("out", "folder for checkpoints, metrics.jsonl and the loss plot")
    dataset: str = _field("data/tinyshakespeare.txt", "text corpus (relative paths: from the repository root)")
    eval_interval: int = _field(250, "steps between evaluations and checkpoints")
    eval_iters: int = _field(200, "batches per split in each evaluation")
    log_interval: int = _field(10, "steps between metric lines in metrics.jsonl")
    batch_size: int = _field(64, "global batch of one micro-step, split over devices")
    gradient_accumulation_steps: int = _field(1, "micro-steps per optimizer step")
    learning_rate: float = _field(1e-3, "peak learning rate")
    max_iters: int = _field(5000, "optimizer steps in the run")
    weight_decay: float = _field(0.1, "AdamW weight decay (matrices only)")
    beta1: float = _field(0.9, "AdamW beta1")
    beta2: float = _field(0.99, "AdamW beta2")
    grad_clip: float = _field(1.0, "clip gradients to this global norm; 0 disables")
    decay_lr: bool = _field(True, "cosine-decay the learning rate after warm-up")
    warmup_iters: int = _field(100, "linear warm-up steps")
    lr_decay_iters: int = _field(5000, "step at which the cosine reaches min_lr")
    min_lr: float = _field(1e-4, "learning rate at the end of the decay")
    seed: int = _field(1337, "seed of parameters, batches and dropout")
    dtype: str = _field("auto", "compute dtype: auto (bfloat16 on GPU/TPU, float32 on CPU), float32, bfloat16")
    peak_tflops: float = _field(0.0, "peak FLOP/s (in TFLOP/s) for MFU; 0: datasheet table or measured on CPU")
    prefetch: int = _field(2, "batches prepared ahead of the step on a host thread")
    unroll_layers: bool = _field(True, "unroll the layer scan in the train and eval steps (faster steps, compile time grows with depth)")
    cpu_kernels: bool = _field(True, "on CPU, causal attention (without attention dropout) and LayerNorm in gpt_jax's C++ kernels (float32; built on first use); false: XLA ops")
    parallel: str = _field("sharding", "data-parallel mode over all devices: sharding, shard_map, pmap, fsdp")
    always_save_checkpoint: bool = _field(True, "save the latest checkpoint at every evaluation, not only when val improves")

    def __post_init__(self):
        for name in ("eval_interval", "eval_iters", "log_interval", "batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}; set --{name}=<a positive integer>")
        for name in ("max_iters", "warmup_iters", "lr_decay_iters", "prefetch"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "peak_tflops"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.parallel not in ("sharding", "shard_map", "pmap", "fsdp"):
            raise ConfigError(f"parallel must be sharding, shard_map, pmap or fsdp, got {self.parallel!r}")
        if self.min_lr > self.learning_rate:
            raise ConfigError(f"min_lr ({self.min_lr}) is above learning_rate ({self.learning_rate}); lower min_lr")


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run: the model and the training settings."""

    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()

    @property
    def tokens_per_step(self) -> int:
        """Tokens in one optimizer step: micro-batch x accumulation steps x block size."""
        return self.train.batch_size * self.train.gradient_accumulation_steps * self.model.block_size

    def to_dict(self) -> dict:
        """Flat {key: value}, the form of a config file."""
        return {**dataclasses.asdict(self.model), **dataclasses.asdict(self.train)}


_SECTIONS = {"model": ModelConfig, "train": TrainConfig}


def fields() -> dict[str, tuple[str, dataclasses.Field]]:
    """Every config key -> (section, field), in declaration order."""
    return {f.name: (section, f) for section, cls in _SECTIONS.items() for f in dataclasses.fields(cls)}


def _closest_divisor(n: int, near: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - near))


def _unknown_key(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(fields()), n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'?" if close else "see --help for the valid keys"
    return ConfigError(f"unknown config key '{key}': {hint}")


def _base_type(annotation) -> tuple[type, bool]:
    """(type, optional) of a field annotation such as `int | None`."""
    hint = annotation
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def type_name(f: dataclasses.Field) -> str:
    base, optional = _base_type(f.type)
    return base.__name__ + (" (optional)" if optional else "")


def _coerce(key: str, value, f: dataclasses.Field, from_text: bool):
    """Convert a TOML value or an override string to the field's type, or raise ConfigError."""
    base, optional = _base_type(f.type)
    if optional and (value is None or (from_text and value.lower() in ("none", ""))):
        return None
    if from_text:
        text = value
        try:
            if base is bool:
                if text.lower() in ("true", "1", "yes"):
                    return True
                if text.lower() in ("false", "0", "no"):
                    return False
                raise ValueError
            return base(text) if base is not int else int(text, 10)
        except ValueError:
            raise ConfigError(f"--{key}={text}: expected {base.__name__}, e.g. --{key}={_example(base)}") from None
    ok = isinstance(value, base) and not (base is not bool and isinstance(value, bool))
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise ConfigError(f"{key} = {value!r}: expected {base.__name__}, e.g. {key} = {_example(base)}")
    return value


def _example(base: type) -> str:
    return {int: "4", float: "0.001", bool: "true", str: "out"}[base]


def load(path: str | Path | None = None, overrides: dict[str, str] | None = None, **values) -> Config:
    """Build a Config from a TOML file, `--key=value` override strings and typed keyword values.

    Args:
      path: a flat TOML file of config keys, or None for the defaults.
      overrides: {key: text} from the command line, converted to each field's type.
      **values: {key: value} already typed (for code and tests).
    Returns:
      The validated, frozen Config. Raises ConfigError on any problem.
    """
    table = fields()
    chosen: dict[str, object] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}; pass one of {', '.join(sorted(p.name for p in (REPO_ROOT / 'configs').glob('*.toml')))} from configs/")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: TOML syntax error: {e}; fix the file") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not UTF-8 text; save the config as UTF-8") from None
        for key, value in data.items():
            if key not in table:
                raise _unknown_key(key)
            chosen[key] = _coerce(key, value, table[key][1], from_text=False)
    for key, text in (overrides or {}).items():
        if key not in table:
            raise _unknown_key(key)
        chosen[key] = _coerce(key, text, table[key][1], from_text=True)
    for key, value in values.items():
        if key not in table:
            raise _unknown_key(key)
        chosen[key] = _coerce(key, value, table[key][1], from_text=False)
    sections = {name: {k: v for k, v in chosen.items() if table[k][0] == name} for name in _SECTIONS}
    return Config(model=ModelConfig(**sections["model"]), train=TrainConfig(**sections["train"]))


def parse_overrides(argv: list[str]) -> dict[str, str]:
    """['--key=value', ...] -> {key: 'value'}; a bare `--flag` means 'true'."""
    out = {}
    for arg in argv:
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; settings are given as --key=value")
        key, sep, value = arg[2:].partition("=")
        out[key] = value if sep else "true"
    return out


def help_text() -> str:
    """One line per key: name, type, default, meaning."""
    lines = []
    for name, (section, f) in fields().items():
        lines.append(f"  --{name:<28} {type_name(f):<16} default {f.default!r:<28} {f.metadata['help']}")
    return "\n".join(lines)
