"""gpt_jax: a GPT built from scratch in JAX, as pure functions.

    from gpt_jax import ModelConfig, init_params, forward, loss_fn

The names below load on first use (PEP 562), so `import gpt_jax.config` or `gpt_jax.hostmem` does not import
JAX: the scripts check their arguments and set up the host allocator before JAX starts.
"""

import importlib

_EXPORTS = {
    "Config": "config", "ModelConfig": "config", "TrainConfig": "config",
    "get_batch": "data",
    "CheckpointError": "errors", "ConfigError": "errors", "DataError": "errors", "GPTJaxError": "errors",
    "TrainingDiverged": "errors",
    "count_params": "model", "flops_per_token": "model", "forward": "model", "init_params": "model",
    "loss_fn": "model",
    "CharTokenizer": "tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"gpt_jax.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'gpt_jax' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_EXPORTS])
