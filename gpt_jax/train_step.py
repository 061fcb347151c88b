"""The train state and the jit-able train and eval steps, written once as single-device code.

Data parallelism (gpt_jax.parallel) only adds shardings around these functions.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax.training import train_state

from gpt_jax.config import Config
from gpt_jax.model import init_params, loss_fn
from gpt_jax.optim import lr_schedule, make_optimizer


class TrainState(train_state.TrainState):
    """step, params, opt_state (from flax) plus the dropout key.

    `rng` holds raw uint32 key data (checkpoints store plain arrays); `fold_in(key, step)` keys each step.
    """

    rng: jax.Array  # (2,) uint32 for the default threefry key


def compute_dtype(name: str):
    """The compute dtype for a config value: auto is bfloat16 on accelerators, float32 on CPU."""
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(name).type


def create_train_state(cfg: Config) -> TrainState:
    """Fresh parameters and optimizer state from cfg.train.seed."""
    key_params, key_dropout = jax.random.split(jax.random.key(cfg.train.seed))
    params = init_params(key_params, cfg.model)
    state = TrainState.create(apply_fn=None, params=params, tx=make_optimizer(cfg.train),
                              rng=jax.random.key_data(key_dropout))
    return state.replace(step=jnp.zeros((), jnp.int32))  # an array, so checkpoints and jit see one type


def wants_cpu_kernels(cfg: Config, *, per_device: bool) -> bool:
    """Whether a step asks for gpt_jax's C++ CPU kernels (`cpu_kernels`; the model still checks where they
    apply). Not in a jit that XLA partitions over several devices (sharding, fsdp): a custom call has no
    partitioning rule, so XLA would gather its inputs onto every device. Per-device programs (shard_map,
    pmap) and single-device runs use them."""
    return cfg.train.cpu_kernels and (per_device or jax.device_count() == 1)


def make_train_step(cfg: Config, *, axis_name: str | None = None, all_reduce: bool = True) -> Callable:
    """train_step(state, x_ABT, y_ABT) -> (state, metrics): one optimizer step over A micro-batches.

    Gradients are averaged over the A = gradient_accumulation_steps micro-batches, which makes the update
    the same as one step on the whole (A*B, T) batch. Dropout keys: fold_in(fold_in(rng, step), micro).

    With `axis_name` the step is a per-device program (shard_map, pmap): the batch is this device's slice,
    dropout keys also fold in the device index, and the loss and gradients are averaged over the axis with
    an explicit `lax.pmean` (left out with all_reduce=False, which isolates compute for the benchmark;
    then each device applies its local gradients, not a valid data-parallel update).
    """
    dtype = compute_dtype(cfg.train.dtype)
    schedule = lr_schedule(cfg.train)
    grad_fn = jax.value_and_grad(loss_fn)
    cpu_kernels = wants_cpu_kernels(cfg, per_device=axis_name is not None)

    def train_step(state: TrainState, x_ABT: jax.Array, y_ABT: jax.Array):
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        if axis_name is not None:
            step_key = jax.random.fold_in(step_key, jax.lax.axis_index(axis_name))

        def micro(carry, inputs):
            loss_sum, grads_sum = carry
            i, x_BT, y_BT = inputs
            key = jax.random.fold_in(step_key, i) if cfg.model.dropout > 0 else None
            loss, grads = grad_fn(state.params, x_BT, y_BT, cfg.model, dropout_key=key, dtype=dtype,
                                  unroll=cfg.train.unroll_layers, cpu_kernels=cpu_kernels)
            return (loss_sum + loss, jax.tree.map(jnp.add, grads_sum, grads)), None

        A = x_ABT.shape[0]
        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (loss_sum, grads_sum), _ = jax.lax.scan(micro, (jnp.zeros((), jnp.float32), zeros), (jnp.arange(A), x_ABT, y_ABT))
        loss, grads = loss_sum / A, jax.tree.map(lambda g: g / A, grads_sum)
        if axis_name is not None and all_reduce:
            loss, grads = jax.lax.pmean((loss, grads), axis_name)  # the gradient all-reduce
        metrics = {"loss": loss, "grad_norm": global_norm(grads), "lr": schedule(state.step)}
        return state.apply_gradients(grads=grads), metrics

    return train_step


def global_norm(tree) -> jax.Array:
    """sqrt of the sum of squares of all leaves."""
    return jnp.sqrt(sum(jnp.vdot(x, x) for x in jax.tree.leaves(tree)))


def make_eval_step(cfg: Config) -> Callable:
    """eval_step(params, x_BT, y_BT) -> mean loss, eval mode (no dropout)."""
    dtype = compute_dtype(cfg.train.dtype)
    cpu_kernels = wants_cpu_kernels(cfg, per_device=False)

    def eval_step(params: dict, x_BT: jax.Array, y_BT: jax.Array) -> jax.Array:
        return loss_fn(params, x_BT, y_BT, cfg.model, dtype=dtype, unroll=cfg.train.unroll_layers,
                       cpu_kernels=cpu_kernels)

    return eval_step


def with_vocab(cfg: Config, vocab_size: int) -> Config:
    """The config with the model's vocabulary taken from the tokenizer (unless set explicitly)."""
    if cfg.model.vocab_size is not None:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab_size))
