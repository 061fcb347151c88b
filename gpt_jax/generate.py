"""Text generation with a KV cache, compiled as one loop (no Python dispatch per token).

`generate` prefills the cache with the prompt, then each step feeds one token and reuses the cached keys
and values. Once the text outgrows block_size, the context slides: the last block_size tokens are
re-prefilled at every step, which is exactly what recomputing from the cropped context gives (positions
are absolute and learned, so no cached entry stays valid when the window moves).
"""

import functools

import jax
import jax.numpy as jnp

from gpt_jax.config import ModelConfig
from gpt_jax.errors import ConfigError
from gpt_jax.model import forward, forward_with_cache


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, vocab_size: int | None = None) -> None:
    """ConfigError for settings that cannot sample."""
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}; use --top_k=1 for greedy decoding")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}")
    if top_k is not None and vocab_size is not None and top_k > vocab_size:
        raise ConfigError(f"top_k ({top_k}) exceeds the vocabulary size ({vocab_size}); use --top_k={vocab_size} or less")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")


def filter_logits(logits_BV: jax.Array, temperature, top_k: int | None = None, top_p=None) -> jax.Array:
    """Scale by 1/temperature, then keep the k largest and/or the smallest set whose probability reaches
    top_p; everything else becomes -inf."""
    logits_BV = logits_BV / temperature
    if top_k is not None:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if top_p is not None:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass of strictly larger tokens
        # a token stays while the tokens ranked above it hold less than top_p
        cutoff_B1 = jnp.min(jnp.where(mass_before_BV < top_p, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
    return logits_BV


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "top_k", "use_top_p", "dtype"))
def _generate(params, cfg, prompt_BP, key, max_new_tokens, temperature, top_k, top_p, use_top_p, dtype):
    B, P = prompt_BP.shape
    T = cfg.block_size
    total = P + max_new_tokens
    buf_BN = jnp.zeros((B, max(total, T)), jnp.int32).at[:, :P].set(prompt_BP)

    def prefill(buf_BN, length):
        """Logits after the last min(length, T) tokens, and a cache of that window (positions 0..T-1)."""
        start = jnp.maximum(length - T, 0)
        window_BT = jax.lax.dynamic_slice_in_dim(buf_BN, start, T, axis=1)  # padding after `length` is masked out causally
        logits_BTV, cache = forward_with_cache(params, window_BT, cfg, dtype=dtype)
        last = jnp.minimum(length, T) - 1
        return jax.lax.dynamic_index_in_dim(logits_BTV, last, axis=1, keepdims=False), cache

    def decode(buf_BN, length, cache):
        """Feed the token at position length-1 (< T) through the cache."""
        token_B1 = jax.lax.dynamic_slice_in_dim(buf_BN, length - 1, 1, axis=1)
        logits_B1V, cache = forward_with_cache(params, token_B1, cfg, dtype=dtype, cache=cache, pos=length - 1)
        return logits_B1V[:, 0], cache

    logits_BV, cache = prefill(buf_BN, P)

    def step(i, carry):
        buf_BN, logits_BV, cache = carry
        filtered = filter_logits(logits_BV, temperature, top_k, top_p if use_top_p else None)
        next_B = jax.random.categorical(jax.random.fold_in(key, i), filtered, axis=-1).astype(jnp.int32)
        length = P + i + 1
        buf_BN = jax.lax.dynamic_update_slice_in_dim(buf_BN, next_B[:, None], length - 1, axis=1)
        logits_BV, cache = jax.lax.cond(length <= T, decode, lambda b, n, c: prefill(b, n), buf_BN, length, cache)
        return buf_BN, logits_BV, cache

    buf_BN, _, _ = jax.lax.fori_loop(0, max_new_tokens, step, (buf_BN, logits_BV, cache))
    return buf_BN[:, :total]


def generate(params: dict, cfg: ModelConfig, prompt_BT, key: jax.Array, max_new_tokens: int, *,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             dtype=jnp.float32) -> jax.Array:
    """Sample max_new_tokens after each prompt.

    Args:
      params, cfg: the model.
      prompt_BT: (B, P) int token ids, P >= 1 (B prompts of one length).
      key: PRNG key; the same key gives the same text.
      temperature: > 0. top_k: keep the k most likely tokens (1: greedy). top_p: nucleus sampling in (0, 1].
    Returns:
      (B, P + max_new_tokens) int32: the prompts followed by the samples.
    """
    prompt_BT = jnp.asarray(prompt_BT, jnp.int32)
    if prompt_BT.ndim != 2 or prompt_BT.shape[1] < 1:
        raise ConfigError(f"prompt must be (B, P) token ids with P >= 1, got shape {prompt_BT.shape}")
    check_sampling(temperature, top_k, top_p, cfg.vocab_size)
    return _generate(params, cfg, prompt_BT, key, max_new_tokens, temperature, top_k,
                     1.0 if top_p is None else top_p, top_p is not None, dtype)


@functools.partial(jax.jit, static_argnames=("cfg", "top_k", "top_p", "dtype"))
def _next_token_naive(params, cfg, context_BT, key, temperature, top_k, top_p, dtype):
    logits_BV = forward(params, context_BT, cfg, dtype=dtype)[:, -1]
    filtered = filter_logits(logits_BV, temperature, top_k, top_p)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


def generate_naive(params: dict, cfg: ModelConfig, prompt_BT, key: jax.Array, max_new_tokens: int, *,
                   temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                   dtype=jnp.float32) -> jax.Array:
    """nanoGPT's way, as the reference: recompute the logits from the last block_size tokens for every new
    token, one jitted call (forward, filter, sample) per token, compiled once per context length."""
    check_sampling(temperature, top_k, top_p, cfg.vocab_size)
    tokens_BN = jnp.asarray(prompt_BT, jnp.int32)
    for i in range(max_new_tokens):
        next_B = _next_token_naive(params, cfg, tokens_BN[:, -cfg.block_size:], jax.random.fold_in(key, i),
                                   temperature, top_k, top_p, dtype)
        tokens_BN = jnp.concatenate([tokens_BN, next_B[:, None]], axis=1)
    return tokens_BN


def load_model(out_dir, kind: str = "best"):
    """(params, model config, tokenizer) from a training run's checkpoint (`best`, else `latest`)."""
    from gpt_jax import checkpoint, config
    from gpt_jax.tokenizer import CharTokenizer
    from gpt_jax.train_step import create_train_state

    if kind == "best" and checkpoint.latest_step(out_dir, "best") is None:
        kind = "latest"
    _, meta = checkpoint.read_meta(out_dir, kind)
    cfg = config.load(**meta["config"])
    abstract = jax.eval_shape(lambda: create_train_state(cfg))
    state, _ = checkpoint.restore(out_dir, kind, abstract)
    return state.params, cfg.model, CharTokenizer.from_json(meta["tokenizer"])
