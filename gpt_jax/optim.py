"""The optimizer: global-norm clipping, then AdamW with linear warm-up and cosine decay.

Weight decay applies to matrices and embeddings only, chosen by parameter path: a leaf under `blocks`
carries a leading layer axis, so its own rank is ndim - 1; leaves of own rank >= 2 decay, vectors
(biases, LayerNorm scales) do not (nanoGPT's rule, adapted to stacked layers).
"""

import functools

import optax
from flax import traverse_util

from gpt_jax.config import TrainConfig


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warm-up from lr/(warmup+1) to lr over warmup_iters, cosine to min_lr at lr_decay_iters."""
    if not cfg.decay_lr:
        return optax.constant_schedule(cfg.learning_rate)
    warmup = min(cfg.warmup_iters, cfg.lr_decay_iters)
    return optax.warmup_cosine_decay_schedule(
        init_value=cfg.learning_rate / (warmup + 1),
        peak_value=cfg.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(cfg.lr_decay_iters, warmup + 1),
        end_value=cfg.min_lr,
    )


def decay_mask(params: dict) -> dict:
    """True where weight decay applies (matrices and embeddings), by parameter path."""
    flat = traverse_util.flatten_dict(params)
    own_rank = {path: leaf.ndim - (1 if path[0] == "blocks" else 0) for path, leaf in flat.items()}
    return traverse_util.unflatten_dict({path: rank >= 2 for path, rank in own_rank.items()})


@functools.cache  # one object per config: TrainState carries it as static pytree metadata, compared by identity
def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """optax chain: clip by global norm (if grad_clip > 0), then AdamW with the schedule and decay mask.

    The chain's structure does not depend on grad_clip (identity in its place), so a run can resume with
    another clipping setting.
    """
    adamw = optax.adamw(
        lr_schedule(cfg), b1=cfg.beta1, b2=cfg.beta2, weight_decay=cfg.weight_decay, mask=decay_mask
    )
    clip = optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity()
    return optax.chain(clip, adamw)

