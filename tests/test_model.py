import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax import ConfigError, ModelConfig, count_params, flops_per_token, forward, init_params, loss_fn

CFG = ModelConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.1, bias=True)


def maybe_jit(fn, use_jit):
    return jax.jit(fn) if use_jit else fn


@pytest.fixture(scope="module")
def params():
    return init_params(jax.random.key(0), CFG)


def tokens(key=1, shape=(3, 16)):
    return jax.random.randint(jax.random.key(key), shape, 0, CFG.vocab_size)


def test_shakespeare_char_parameter_count():
    cfg = ModelConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384, bias=False)
    shapes = jax.eval_shape(lambda k: init_params(k, cfg), jax.random.key(0))
    assert count_params(shapes) == 10_646_784
    assert count_params(shapes, non_embedding=False) == 10_646_784 + 256 * 384  # 10,745,088
    assert flops_per_token(cfg) == 6 * 10_646_784 + 12 * 6 * 256 * 384


def test_layout_is_stacked_plain_dict(params):
    assert isinstance(params, dict) and set(params) == {"wte", "wpe", "blocks", "ln_f"}
    assert params["blocks"]["attn"]["w_qkv"].shape == (2, 32, 96)
    assert params["blocks"]["mlp"]["w_fc"].shape == (2, 32, 128)
    assert params["blocks"]["ln_1"]["bias"].shape == (2, 32)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    no_bias = init_params(jax.random.key(0), ModelConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32))
    assert "b_qkv" not in no_bias["blocks"]["attn"] and "bias" not in no_bias["ln_f"]


def test_init_statistics(params):
    assert abs(float(params["wte"].std()) - 0.02) < 0.002
    assert abs(float(params["blocks"]["mlp"]["w_proj"].std()) - 0.02 / math.sqrt(4)) < 0.001
    assert float(jnp.abs(params["blocks"]["mlp"]["b_fc"]).max()) == 0.0


def test_same_key_same_params():
    a, b = init_params(jax.random.key(7), CFG), init_params(jax.random.key(7), CFG)
    c = init_params(jax.random.key(8), CFG)
    assert all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b)))
    assert not jnp.array_equal(a["wte"], c["wte"])


@pytest.mark.parametrize("use_jit", [False, True])
def test_shapes_and_jit_agree(params, use_jit):
    fwd = maybe_jit(lambda p, x: forward(p, x, CFG), use_jit)
    logits = fwd(params, tokens())
    assert logits.shape == (3, 16, 65) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, forward(params, tokens(), CFG), rtol=1e-5, atol=1e-5)
    assert forward(params, tokens(shape=(2, 5)), CFG).shape == (2, 5, 65)


def test_too_long_input(params):
    with pytest.raises(ConfigError, match="exceeds block_size 16"):
        forward(params, tokens(shape=(1, 17)), CFG)


def test_initial_loss_near_uniform(params):
    loss = loss_fn(params, tokens(1), tokens(2), CFG)
    assert abs(float(loss) - math.log(65)) < 0.1


@pytest.mark.parametrize("use_jit", [False, True])
def test_causality_through_gradients(params, use_jit):
    x = tokens()
    t = 6

    # Gradient of the logits at position t with respect to the one-hot inputs, via a soft token table.
    def logits_t_from_onehot(onehot_BTV):
        emb_BTD = onehot_BTV @ params["wte"]  # the same lookup, differentiable
        return forward_embedded(params, emb_BTD)[:, t].sum()

    grad = maybe_jit(jax.grad(logits_t_from_onehot), use_jit)(jax.nn.one_hot(x, CFG.vocab_size))  # (B, T, V)
    influence_T = jnp.abs(grad).sum(axis=(0, 2))
    assert float(influence_T[t + 1:].max()) == 0.0  # later tokens never matter
    assert float(influence_T[: t + 1].min()) > 0.0  # earlier ones do


def forward_embedded(params, emb_BTD):
    """forward() entered after the token lookup, for gradient checks w.r.t. the inputs."""
    from gpt_jax import model

    T = emb_BTD.shape[1]
    x = emb_BTD + params["wpe"][:T]
    x, _ = jax.lax.scan(lambda h, p: (model.block(h, p, CFG)[0], None), x, params["blocks"])
    return model.dense(model.layer_norm(x, params["ln_f"]), params["wte"].T)


def test_forward_embedded_matches_forward(params):
    x = tokens()
    np.testing.assert_allclose(forward_embedded(params, params["wte"][x]), forward(params, x, CFG), rtol=1e-5, atol=1e-5)


def test_dropout_on_with_key_off_without(params):
    x = tokens()
    a = forward(params, x, CFG)
    assert jnp.array_equal(a, forward(params, x, CFG))
    b = forward(params, x, CFG, dropout_key=jax.random.key(1))
    c = forward(params, x, CFG, dropout_key=jax.random.key(1))
    d = forward(params, x, CFG, dropout_key=jax.random.key(2))
    assert not jnp.allclose(a, b) and jnp.array_equal(b, c) and not jnp.allclose(b, d)


def test_bfloat16_compute_keeps_float32_outputs(params):
    logits = forward(params, tokens(), CFG, dtype=jnp.bfloat16)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, forward(params, tokens(), CFG), atol=0.05)


def test_tiny_model_overfits_one_batch():
    import optax

    cfg = ModelConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=64, dropout=0.0)
    params = init_params(jax.random.key(0), cfg)
    x, y = tokens(3, (4, 16)), tokens(4, (4, 16))
    opt = optax.adam(3e-3)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y, cfg)
        updates, opt_state = opt.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    for _ in range(300):
        params, opt_state, loss = step(params, opt_state)
    assert float(loss) < 0.1


def test_gpt2_124m_config_is_gpt2_small():
    from gpt_jax import config

    cfg = config.load(config.REPO_ROOT / "configs" / "gpt2_124m.toml").model
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (12, 12, 768, 1024)
    assert cfg.vocab_size % 64 == 0 and cfg.vocab_size >= 50257
    shapes = jax.eval_shape(lambda k: init_params(k, cfg), jax.random.key(0))
    assert count_params(shapes) == 12 * 12 * 768**2 + 12 * 2 * 768 + 768 + 50304 * 768  # 123.59M, as nanoGPT (bias=False)


def test_einsum_attention_matches_jax_dot_product_attention():
    """The fused path (cuDNN on GPU) and ours agree on layout (B, T, H, K), scale and causal mask."""
    from gpt_jax.model import causal_attention

    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 7, 4, 16))
    expected = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    np.testing.assert_allclose(causal_attention(q, k, v), expected, atol=1e-5)


def test_fused_attention_falls_back_where_cudnn_refuses(params, monkeypatch):
    """Pretend to be on a GPU: cuDNN refuses (no cuDNN on this machine) and the einsum path runs instead."""
    from gpt_jax import model

    cfg = dataclasses.replace(CFG, dropout=0.0)
    idx = jax.random.randint(jax.random.key(1), (2, cfg.block_size), 0, cfg.vocab_size)
    expected = forward(params, idx, cfg, dtype=jnp.bfloat16)
    assert model.attention_kernel(cfg, jnp.bfloat16).startswith("XLA einsum (cpu")
    monkeypatch.setattr(model, "_fused_attention_allowed", lambda dtype: True)
    assert model.attention_kernel(cfg, jnp.bfloat16).startswith("XLA einsum (cuDNN refused")
    np.testing.assert_array_equal(forward(params, idx, cfg, dtype=jnp.bfloat16), expected)


def test_unrolled_layers_compute_the_same_loss_and_gradients(params):
    x, y = tokens(1), tokens(2)
    scanned = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, x, y, CFG)))(params)
    unrolled = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, x, y, CFG, unroll=True)))(params)
    for a, b in zip(jax.tree.leaves(scanned), jax.tree.leaves(unrolled)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape, p", [((3,), 0.8), ((7, 5), 0.5), ((4, 3, 64, 64), 0.9), ((2, 16, 32), 0.1)])
def test_dropout_masks_are_jax_random_bernoulli_bit_for_bit(shape, p):
    from gpt_jax import threefry

    for seed in range(3):
        key = jax.random.fold_in(jax.random.key(seed), 7)
        expected = jax.random.bernoulli(key, p, shape)
        assert jnp.array_equal(jax.jit(threefry.bernoulli, static_argnums=(1, 2))(key, p, shape), expected)
        start = tuple(d // 2 for d in shape)  # a block of the mask, drawn alone
        block = tuple(d - s for d, s in zip(shape, start))
        got = threefry.bernoulli(key, p, block, full_shape=shape, start=start)
        assert jnp.array_equal(got, expected[tuple(slice(s, None) for s in start)])


def test_dropout_falls_back_to_jax_random_for_other_key_kinds():
    from gpt_jax import threefry

    key = jax.random.key(3, impl="rbg")
    assert jnp.array_equal(threefry.bernoulli(key, 0.7, (5, 9)), jax.random.bernoulli(key, 0.7, (5, 9)))
    got = threefry.bernoulli(key, 0.7, (3, 4), full_shape=(5, 9), start=(2, 5))
    assert jnp.array_equal(got, jax.random.bernoulli(key, 0.7, (5, 9))[2:, 5:])
    partitionable = getattr(jax.config, "jax_threefry_partitionable", None)  # a flag that newer JAX may drop
    if partitionable is not None:
        key = jax.random.key(3)
        jax.config.update("jax_threefry_partitionable", not partitionable)
        try:
            assert jnp.array_equal(threefry.bernoulli(key, 0.7, (5, 9)), jax.random.bernoulli(key, 0.7, (5, 9)))
        finally:
            jax.config.update("jax_threefry_partitionable", partitionable)


@pytest.mark.parametrize("T, blocks", [(16, 1), (64, 2), (96, 2), (128, 4)])
def test_blocked_causal_attention_equals_full_masked_attention(T, blocks):
    """Skipping the fully masked key blocks changes nothing: values, gradients and the dropout mask."""
    from gpt_jax import model

    assert model.causal_blocks(T) == blocks
    assert f"{blocks} causal query blocks" in model.attention_kernel(dataclasses.replace(CFG, block_size=T), jnp.float32)
    q, k, v, g = jax.random.normal(jax.random.key(T), (4, 2, T, 3, 8))
    mask = jnp.tril(jnp.ones((T, T), bool))
    for rate, key in [(0.0, None), (0.3, jax.random.key(5))]:
        full = lambda q, k, v: jnp.vdot(model.attend(q, k, v, mask, rate=rate, key=key), g)
        blocked = lambda q, k, v: jnp.vdot(model.causal_attention_xla(q, k, v, rate=rate, key=key), g)
        np.testing.assert_allclose(model.causal_attention_xla(q, k, v, rate=rate, key=key),
                                   model.attend(q, k, v, mask, rate=rate, key=key), rtol=1e-5, atol=1e-5)
        for a, b in zip(jax.grad(full, argnums=(0, 1, 2))(q, k, v), jax.grad(blocked, argnums=(0, 1, 2))(q, k, v)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
