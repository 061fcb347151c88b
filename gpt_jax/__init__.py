"""gpt_jax: a GPT built from scratch in JAX, as pure functions.

    from gpt_jax import ModelConfig, init_params, forward, loss_fn
"""

from gpt_jax.config import Config, ModelConfig, TrainConfig
from gpt_jax.data import get_batch
from gpt_jax.errors import CheckpointError, ConfigError, DataError, GPTJaxError, TrainingDiverged
from gpt_jax.model import count_params, flops_per_token, forward, init_params, loss_fn
from gpt_jax.tokenizer import CharTokenizer

__all__ = [
    "CharTokenizer", "CheckpointError", "Config", "ConfigError", "DataError", "GPTJaxError", "ModelConfig",
    "TrainConfig", "TrainingDiverged", "count_params", "flops_per_token", "forward", "get_batch", "init_params",
    "loss_fn",
]
