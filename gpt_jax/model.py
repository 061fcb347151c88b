"""GPT-2 (as nanoGPT builds it) as pure functions of a plain parameter dict.

Dimension glossary (used in names, docstrings and einsum strings):
  B batch, T time (sequence), S key time, D model width (n_embd), H heads, K head size (D / H),
  F MLP width (4 D), V vocabulary, L layers.

Parameter layout (public API): a nested dict of float32 arrays. The blocks are stacked on a leading layer
axis so `lax.scan` runs them and compile time does not grow with depth. Entries marked [bias] exist only
when `cfg.bias`.

  wte              (V, D)      token embedding, tied to the output head
  wpe              (T, D)      learned positions (T = block_size)
  blocks/ln_1      scale (L, D) [bias (L, D)]
  blocks/attn      w_qkv (L, D, 3D) [b_qkv (L, 3D)]   w_out (L, D, D) [b_out (L, D)]
  blocks/ln_2      scale (L, D) [bias (L, D)]
  blocks/mlp       w_fc (L, D, F) [b_fc (L, F)]       w_proj (L, F, D) [b_proj (L, D)]
  ln_f             scale (D,) [bias (D,)]

Precision: parameters are float32; matmuls run in the compute `dtype`; LayerNorm statistics, the softmax
and the loss are float32. Attention is cuDNN's fused kernel on NVIDIA GPUs in 16-bit floats (see
`causal_attention`), with `cpu_kernels=True` on CPU gpt_jax's C++ kernel (`gpt_jax.kernels`, which also has
LayerNorm; the train and eval steps ask for them), an einsum softmax elsewhere (`causal_attention_xla`, in query
blocks that skip the keys the causal mask removes). Dropout masks are `jax.random.bernoulli`'s, drawn by
`gpt_jax.threefry` in one fused pass.
"""

import math

import jax
import jax.numpy as jnp
import optax

from gpt_jax import kernels, threefry
from gpt_jax.config import ModelConfig
from gpt_jax.errors import ConfigError, first_line

INIT_STD = 0.02
LN_EPS = 1e-5


def init_params(key: jax.Array, cfg: ModelConfig) -> dict:
    """Random parameters: weights N(0, 0.02), residual projections scaled by 1/sqrt(2 L), biases 0, LN 1."""
    if cfg.vocab_size is None:
        raise ConfigError("vocab_size is unset; take it from the tokenizer (dataclasses.replace(cfg, vocab_size=...))")
    V, T, D, L, F = cfg.vocab_size, cfg.block_size, cfg.n_embd, cfg.n_layer, 4 * cfg.n_embd
    k_wte, k_wpe, k_qkv, k_out, k_fc, k_proj = jax.random.split(key, 6)
    resid_std = INIT_STD / math.sqrt(2 * L)

    def normal(k, shape, std=INIT_STD):
        return std * jax.random.normal(k, shape, jnp.float32)

    def layer_norm(shape):
        return {"scale": jnp.ones(shape), **({"bias": jnp.zeros(shape)} if cfg.bias else {})}

    def biases(**shapes):
        return {name: jnp.zeros(shape) for name, shape in shapes.items()} if cfg.bias else {}

    return {
        "wte": normal(k_wte, (V, D)),
        "wpe": normal(k_wpe, (T, D)),
        "blocks": {
            "ln_1": layer_norm((L, D)),
            "attn": {
                "w_qkv": normal(k_qkv, (L, D, 3 * D)),
                "w_out": normal(k_out, (L, D, D), resid_std),
                **biases(b_qkv=(L, 3 * D), b_out=(L, D)),
            },
            "ln_2": layer_norm((L, D)),
            "mlp": {
                "w_fc": normal(k_fc, (L, D, F)),
                "w_proj": normal(k_proj, (L, F, D), resid_std),
                **biases(b_fc=(L, F), b_proj=(L, D)),
            },
        },
        "ln_f": layer_norm((D,)),
    }


def count_params(params: dict, non_embedding: bool = True) -> int:
    """Number of parameters; `non_embedding` leaves out the position embedding (nanoGPT's convention:
    the token embedding counts, since it is also the output head)."""
    total = sum(x.size for x in jax.tree_util.tree_leaves(params))
    return total - params["wpe"].size if non_embedding else total


def flops_per_token(cfg: ModelConfig) -> int:
    """Training FLOPs per token, 6 N + 12 L T D (nanoGPT / PaLM), N without position embeddings."""
    shapes = jax.eval_shape(lambda key: init_params(key, cfg), jax.random.key(0))
    return 6 * count_params(shapes) + 12 * cfg.n_layer * cfg.block_size * cfg.n_embd


# ---- layers -------------------------------------------------------------------------------------------


def layer_norm(x_NXD: jax.Array, p: dict, *, cpu_kernels: bool = False) -> jax.Array:
    """LayerNorm over the last axis with float32 statistics; returns x's dtype.

    With `cpu_kernels`, gpt_jax's C++ kernel where it applies (CPU, float32; `gpt_jax.kernels`), else XLA ops.
    """
    if cpu_kernels and kernels.layer_norm_supported(x_NXD.dtype, x_NXD.shape[-1]):
        return kernels.layer_norm(x_NXD, p["scale"], p.get("bias"), eps=LN_EPS)
    return layer_norm_xla(x_NXD, p)


@jax.checkpoint  # the backward pass recomputes this from x instead of keeping (N.., D)-sized intermediates
def layer_norm_xla(x_NXD: jax.Array, p: dict) -> jax.Array:
    """`layer_norm` in XLA ops, under `jax.checkpoint`: autodiff would otherwise save the centred input and
    the scale broadcast to the full activation shape for the backward pass, memory traffic that cost 4% of a
    CPU train step."""
    x = x_NXD.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + LN_EPS) * p["scale"]
    if "bias" in p:
        y = y + p["bias"]
    return y.astype(x_NXD.dtype)


def dense(x_NXD: jax.Array, w_DF: jax.Array, b_F: jax.Array | None = None) -> jax.Array:
    """x @ w (+ b) as one 2-D matmul over the flattened leading axes (XLA:CPU runs those fastest)."""
    lead = x_NXD.shape[:-1]
    y = x_NXD.reshape(-1, x_NXD.shape[-1]) @ w_DF.astype(x_NXD.dtype)
    if b_F is not None:
        y = y + b_F.astype(y.dtype)
    return y.reshape(*lead, w_DF.shape[-1])


def dropout(x: jax.Array, rate: float, key: jax.Array | None, *, full_shape: tuple[int, ...] | None = None,
            start: tuple[int, ...] | None = None) -> jax.Array:
    """Inverted dropout; the identity without a key (eval mode) or at rate 0.

    The mask is `jax.random.bernoulli(key, 1 - rate, x.shape)`'s. With `full_shape`/`start`, x is the block
    of a larger array that begins at `start`, and takes that block of the larger array's mask.
    """
    if key is None or rate == 0.0:
        return x
    keep = threefry.bernoulli(key, 1.0 - rate, x.shape, full_shape=full_shape, start=start)  # one fused pass
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def split_heads(qkv_BT3D: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The packed attention input projection [q | k | v] split into heads: three (B, T, H, K) arrays."""
    B, T, _ = qkv_BT3D.shape
    q, k, v = jnp.split(qkv_BT3D.reshape(B, T, 3 * cfg.n_head, cfg.head_size), 3, axis=2)
    return q, k, v  # each (B, T, H, K)


def attend(q_BTHK, k_BSHK, v_BSHK, mask_TS, *, rate: float = 0.0, key=None, dropout_at=None) -> jax.Array:
    """Softmax attention (float32 softmax) of T queries over S keys where mask_TS is True -> (B, T, H, K).

    `dropout_at` = (full_shape, start) when these probabilities are the block at `start` of a larger
    (B, H, T', S') array: the block then takes its part of that array's dropout mask.
    """
    scale = 1.0 / math.sqrt(q_BTHK.shape[-1])
    att_BHTS = jnp.einsum("bthk,bshk->bhts", q_BTHK, k_BSHK).astype(jnp.float32) * scale
    att_BHTS = jnp.where(mask_TS, att_BHTS, -jnp.inf)
    att_BHTS = jax.nn.softmax(att_BHTS, axis=-1).astype(q_BTHK.dtype)
    full_shape, start = dropout_at or (None, None)
    att_BHTS = dropout(att_BHTS, rate, key, full_shape=full_shape, start=start)
    return jnp.einsum("bhts,bshk->bthk", att_BHTS, v_BSHK)


def causal_blocks(T: int) -> int:
    """How many query blocks causal attention splits T into: 4, 2 or 1, with blocks of at least 32 rows."""
    return next(n for n in (4, 2, 1) if T % n == 0 and T // n >= 32 or n == 1)


def causal_attention_xla(q_BTHK, k_BTHK, v_BTHK, *, rate: float = 0.0, key=None) -> jax.Array:
    """Causal attention in XLA ops, skipping the key blocks that the mask removes anyway.

    The T queries are split into n = causal_blocks(T) blocks; block i attends only to the first
    (i+1) T/n keys, the ones it can see, so the score and value matmuls, the softmax and the dropout do
    (n+1)/2n of the full T x T work (5/8 at n = 4). The result equals full masked attention up to float
    summation order, and every kept probability takes the dropout mask the full (B, H, T, T) array would.
    """
    B, T, H, _ = q_BTHK.shape
    n = causal_blocks(T)
    Tq = T // n
    outs = []
    for i in range(n):
        S = (i + 1) * Tq  # keys this block can see
        mask_TS = jnp.arange(S)[None, :] <= i * Tq + jnp.arange(Tq)[:, None]
        outs.append(attend(q_BTHK[:, i * Tq:S], k_BTHK[:, :S], v_BTHK[:, :S], mask_TS, rate=rate, key=key,
                           dropout_at=((B, H, T, T), (0, 0, i * Tq, 0))))  # (B, Tq, H, K)
    return jnp.concatenate(outs, axis=1)  # (B, T, H, K)


def _fused_attention_allowed(dtype) -> bool:
    """cuDNN's fused attention runs on NVIDIA GPUs in 16-bit floats only."""
    return jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)


def causal_attention(q_BTHK, k_BTHK, v_BTHK, *, rate: float = 0.0, key=None) -> jax.Array:
    """Causal self-attention -> (B, T, H, K).

    On a GPU in bfloat16/float16 and without attention dropout this is cuDNN's fused (flash) kernel via
    `jax.nn.dot_product_attention`; where cuDNN rejects the shape, dtype or version at trace time, and
    everywhere else (CPU, float32, dropout on the probabilities), `causal_attention_xla`.
    """
    if _fused_attention_allowed(q_BTHK.dtype) and (rate == 0.0 or key is None):
        try:
            return jax.nn.dot_product_attention(q_BTHK, k_BTHK, v_BTHK, is_causal=True, implementation="cudnn")
        except (ValueError, TypeError, NotImplementedError, RuntimeError):
            pass  # unsupported here: fall back to XLA
    return causal_attention_xla(q_BTHK, k_BTHK, v_BTHK, rate=rate, key=key)


def use_cpu_attention(cfg: ModelConfig, dtype, T: int, *, cpu_kernels: bool, dropout_on: bool) -> bool:
    """Whether causal attention over T positions runs in gpt_jax's C++ kernel: asked for, no attention dropout
    in this call, and supported here (CPU, float32, T and head size multiples of 8, a C++ compiler)."""
    return (cpu_kernels and not (dropout_on and cfg.dropout > 0)
            and kernels.attention_supported(dtype, T, cfg.head_size))


def attention_kernel(cfg: ModelConfig, dtype, batch_size: int = 1, train: bool = True,
                     cpu_kernels: bool = False) -> str:
    """Which attention path a forward pass of `cfg` in `dtype` takes on this backend, in words."""
    blocks = causal_blocks(cfg.block_size)
    if use_cpu_attention(cfg, dtype, cfg.block_size, cpu_kernels=cpu_kernels, dropout_on=train):
        return "gpt_jax C++ kernel (cpu, float32, gpt_jax/csrc/cpu_kernels.cc)"
    if not _fused_attention_allowed(dtype):
        return f"XLA einsum ({jax.default_backend()}, {jnp.dtype(dtype).name}, {blocks} causal query blocks)"
    if train and cfg.dropout > 0:
        return f"XLA einsum (attention dropout {cfg.dropout} is not fused, {blocks} causal query blocks)"
    shape = jax.ShapeDtypeStruct((batch_size, cfg.block_size, cfg.n_head, cfg.head_size), dtype)
    try:
        jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")).lower(
            shape, shape, shape).compile()
    except Exception as e:  # noqa: BLE001 - any refusal means the fallback runs
        return f"XLA einsum (cuDNN refused: {first_line(e, 100)})"
    return "cuDNN fused (jax.nn.dot_product_attention)"


def mlp(x_BTD: jax.Array, p: dict) -> jax.Array:
    """4x GELU MLP (tanh approximation, as GPT-2)."""
    h = jax.nn.gelu(dense(x_BTD, p["w_fc"], p.get("b_fc")), approximate=True)  # (B, T, F)
    return dense(h, p["w_proj"], p.get("b_proj"))


def block(x_BTD: jax.Array, p: dict, cfg: ModelConfig, key: jax.Array | None = None, *,
          cache: tuple[jax.Array, jax.Array] | None = None, pos=0,
          cpu_kernels: bool = False) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """One pre-LayerNorm transformer block with causal self-attention. `p` holds one layer's slice.

    Without `cache` the T positions attend to each other causally (with `cpu_kernels`, in the C++ kernel
    where `use_cpu_attention` allows). With `cache` (keys and values, each (B, S, H, K)), the T new positions
    sit at pos..pos+T-1: their keys and values are written into the cache and each query attends to cache
    positions up to its own. Returns (x_BTD, (keys, values)): the updated cache, or this block's own keys
    and values.
    """
    T = x_BTD.shape[1]
    k_att, k_res1, k_res2 = jax.random.split(key, 3) if key is not None else (None, None, None)
    qkv = dense(layer_norm(x_BTD, p["ln_1"], cpu_kernels=cpu_kernels), p["attn"]["w_qkv"], p["attn"].get("b_qkv"))
    q, k, v = split_heads(qkv, cfg)  # qkv (B, T, 3D) -> (B, T, H, K) each
    if cache is None and use_cpu_attention(cfg, qkv.dtype, T, cpu_kernels=cpu_kernels, dropout_on=key is not None):
        y = kernels.causal_attention(qkv, cfg.n_head)  # (B, T, D), straight from the packed projection
    elif cache is None:
        y = causal_attention(q, k, v, rate=cfg.dropout, key=k_att)  # (B, T, H, K)
    else:
        k = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), pos, axis=1)  # (B, S, H, K)
        v = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), pos, axis=1)
        mask_TS = jnp.arange(k.shape[1])[None, :] <= pos + jnp.arange(T)[:, None]
        y = attend(q, k, v, mask_TS, rate=cfg.dropout, key=k_att)
    y = y.reshape(x_BTD.shape)  # (B, T, D)
    x_BTD = x_BTD + dropout(dense(y, p["attn"]["w_out"], p["attn"].get("b_out")), cfg.dropout, k_res1)
    x_BTD = x_BTD + dropout(mlp(layer_norm(x_BTD, p["ln_2"], cpu_kernels=cpu_kernels), p["mlp"]), cfg.dropout, k_res2)
    return x_BTD, (k, v)


def forward_with_cache(params: dict, idx_BT: jax.Array, cfg: ModelConfig, *, dropout_key: jax.Array | None = None,
                       dtype=jnp.float32, cache: tuple[jax.Array, jax.Array] | None = None,
                       pos=0, unroll: bool = False,
                       cpu_kernels: bool = False) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """forward() that also returns the keys and values of every layer, each (L, B, S, H, K).

    The blocks run in a `lax.scan` over the stacked layer axis; `unroll=True` unrolls it (the same
    arithmetic; compile time grows with depth, steps run faster on CPU: see docs/benchmarks.md).
    `cpu_kernels=True` runs causal attention and LayerNorm in gpt_jax's C++ kernels where they apply
    (`gpt_jax.kernels`): faster on CPU, the same values to float tolerance, with jax.grad/vmap/jit but no
    jax.jvp through them.

    With `cache` (from an earlier call), idx_BT holds the tokens at positions pos..pos+T-1 and only they are
    computed: the KV-cache decode step. Without it, the returned keys and values are the prefill cache.
    """
    B, T = idx_BT.shape
    if T > cfg.block_size:
        raise ConfigError(f"sequence length {T} exceeds block_size {cfg.block_size}; crop the input")
    k_emb, k_blocks = jax.random.split(dropout_key) if dropout_key is not None else (None, None)
    pos_TD = jax.lax.dynamic_slice_in_dim(params["wpe"], pos, T, axis=0)
    x_BTD = (params["wte"][idx_BT] + pos_TD).astype(dtype)
    x_BTD = dropout(x_BTD, cfg.dropout, k_emb)
    layer_keys = jax.random.split(k_blocks, cfg.n_layer) if k_blocks is not None else None

    def body(x, layer):
        p, key, layer_cache = layer
        return block(x, p, cfg, key, cache=layer_cache, pos=pos, cpu_kernels=cpu_kernels)

    x_BTD, kv = jax.lax.scan(body, x_BTD, (params["blocks"], layer_keys, cache), unroll=bool(unroll))
    x_BTD = layer_norm(x_BTD, params["ln_f"], cpu_kernels=cpu_kernels)
    return dense(x_BTD, params["wte"].T).astype(jnp.float32), kv  # (B, T, V): tied head


def forward(params: dict, idx_BT: jax.Array, cfg: ModelConfig, *, dropout_key: jax.Array | None = None,
            dtype=jnp.float32, unroll: bool = False, cpu_kernels: bool = False) -> jax.Array:
    """Token ids (B, T) -> float32 logits (B, T, V). Train mode (dropout) with a key, eval mode without."""
    return forward_with_cache(params, idx_BT, cfg, dropout_key=dropout_key, dtype=dtype, unroll=unroll,
                              cpu_kernels=cpu_kernels)[0]


def loss_fn(params: dict, x_BT: jax.Array, y_BT: jax.Array, cfg: ModelConfig, *,
            dropout_key: jax.Array | None = None, dtype=jnp.float32, unroll: bool = False,
            cpu_kernels: bool = False) -> jax.Array:
    """Mean next-token cross-entropy in float32."""
    logits_BTV = forward(params, x_BT, cfg, dropout_key=dropout_key, dtype=dtype, unroll=unroll,
                         cpu_kernels=cpu_kernels)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, y_BT).mean()
