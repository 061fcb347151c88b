"""gpt_jax's C++ CPU kernels (gpt_jax.kernels: attention, LayerNorm) against the XLA path, and the fallbacks."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax import ModelConfig, init_params, kernels, loss_fn, model

from conftest import REPO

CFG = ModelConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)
pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C++ compiler for the kernels")


def xla_attention(qkv_BT3D, n_head):
    *lead, T, C = qkv_BT3D.shape
    qkv = qkv_BT3D.reshape(-1, T, C)
    q, k, v = model.split_heads(qkv, dataclasses.replace(CFG, n_head=n_head, n_embd=C // 3))
    return model.causal_attention_xla(q, k, v).reshape(*lead, T, C // 3)


@pytest.mark.parametrize("B, T, H, K", [(3, 64, 4, 32), (2, 16, 2, 8), (2, 256, 2, 64), (1, 40, 3, 16), (2, 8, 1, 24)])
def test_kernel_equals_xla_attention_values_and_gradients(B, T, H, K):
    qkv = 2 * jax.random.normal(jax.random.key(T), (B, T, 3 * H * K))
    g = jax.random.normal(jax.random.key(K), (B, T, H * K))
    y, vjp = jax.vjp(lambda a: kernels.causal_attention(a, H), qkv)
    y_ref, vjp_ref = jax.vjp(lambda a: xla_attention(a, H), qkv)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(vjp(g)[0], vjp_ref(g)[0], rtol=1e-4, atol=5e-5)
    jitted = jax.jit(jax.grad(lambda a: jnp.vdot(kernels.causal_attention(a, H), g)))(qkv)
    np.testing.assert_allclose(jitted, vjp_ref(g)[0], rtol=1e-4, atol=5e-5)


def test_kernel_is_causal():
    """Changing a later position's q, k or v leaves every earlier output unchanged."""
    qkv = jax.random.normal(jax.random.key(0), (1, 16, 3 * 32))
    changed = qkv.at[:, 9:].add(1.0)
    a, b = kernels.causal_attention(qkv, 2), kernels.causal_attention(changed, 2)
    np.testing.assert_array_equal(a[:, :9], b[:, :9])
    assert not np.allclose(a[:, 9:], b[:, 9:])


def test_kernel_under_vmap():
    qkv = jax.random.normal(jax.random.key(1), (3, 2, 16, 96))
    np.testing.assert_allclose(jax.vmap(lambda a: kernels.causal_attention(a, 2))(qkv), xla_attention(qkv, 2),
                               rtol=1e-5, atol=2e-5)


def test_loss_and_gradients_with_the_kernel_equal_the_xla_path():
    params = init_params(jax.random.key(0), CFG)
    x, y = (jax.random.randint(jax.random.key(i), (4, 16), 0, 65) for i in (1, 2))
    with_kernel = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, x, y, CFG, cpu_kernels=True)))(params)
    without = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, x, y, CFG)))(params)
    for a, b in zip(jax.tree.leaves(with_kernel), jax.tree.leaves(without)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape, bias", [((40, 64, 128), True), ((3, 5, 32), False), ((7, 8), True)])
def test_layer_norm_kernel_equals_xla_values_and_gradients(shape, bias):
    keys = jax.random.split(jax.random.key(len(shape)), 4)
    x = 3 * jax.random.normal(keys[0], shape) + 1
    p = {"scale": jax.random.normal(keys[1], shape[-1:])}
    if bias:
        p["bias"] = jax.random.normal(keys[2], shape[-1:])
    g = jax.random.normal(keys[3], shape)
    y, vjp = jax.vjp(lambda x, p: kernels.layer_norm(x, p["scale"], p.get("bias"), eps=model.LN_EPS), x, p)
    y_ref, vjp_ref = jax.vjp(model.layer_norm_xla, x, p)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(vjp(g)), jax.tree.leaves(vjp_ref(g))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(model.layer_norm(x, p, cpu_kernels=True), y_ref, rtol=1e-5, atol=1e-5)


def test_layer_norm_kernel_under_vmap_with_batched_parameters():
    x = jax.random.normal(jax.random.key(0), (3, 4, 16))
    scale, bias = jax.random.normal(jax.random.key(1), (2, 3, 16))  # a different scale and bias per element
    got = jax.vmap(lambda x, s, b: kernels.layer_norm(x, s, b, eps=model.LN_EPS))(x, scale, bias)
    expected = jax.vmap(lambda x, s, b: model.layer_norm_xla(x, {"scale": s, "bias": b}))(x, scale, bias)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_kernels_refuse_shapes_they_cannot_take():
    with pytest.raises(ValueError, match="T and K multiples of 8"):
        kernels.causal_attention(jnp.zeros((2, 12, 96)), 2)  # T = 12
    with pytest.raises(ValueError, match="T and K multiples of 8"):
        kernels.causal_attention(jnp.zeros((2, 16, 96)), 5)  # 96 is not 3 x 5 heads x K
    with pytest.raises(ValueError, match="D a multiple of 8"):
        kernels.layer_norm(jnp.zeros((4, 12)), jnp.ones(12), eps=1e-5)
    with pytest.raises(ValueError, match="float32"):
        kernels.layer_norm(jnp.zeros((4, 16), jnp.bfloat16), jnp.ones(16), eps=1e-5)


def test_default_forward_keeps_forward_mode_autodiff():
    """forward/loss_fn default to the XLA path, which jax.jvp (and so Hessian-vector products) can trace."""
    params = init_params(jax.random.key(0), CFG)
    x, y = (jax.random.randint(jax.random.key(i), (2, 16), 0, 65) for i in (1, 2))
    loss, tangent = jax.jvp(lambda p: loss_fn(p, x, y, CFG), (params,), (params,))
    assert np.isfinite(loss) and np.isfinite(tangent)


def test_where_the_kernel_applies():
    ok = dict(cpu_kernels=True, dropout_on=False)
    assert model.use_cpu_attention(CFG, jnp.float32, 16, **ok)
    assert not model.use_cpu_attention(CFG, jnp.float32, 16, cpu_kernels=False, dropout_on=False)
    assert not model.use_cpu_attention(CFG, jnp.float32, 12, **ok)  # T not a multiple of 8
    assert not model.use_cpu_attention(CFG, jnp.bfloat16, 16, **ok)
    assert model.use_cpu_attention(dataclasses.replace(CFG, n_head=4), jnp.float32, 16, **ok)  # head size 8
    assert not model.use_cpu_attention(dataclasses.replace(CFG, n_head=8), jnp.float32, 16, **ok)  # head size 4
    dropout = dataclasses.replace(CFG, dropout=0.1)
    assert not model.use_cpu_attention(dropout, jnp.float32, 16, cpu_kernels=True, dropout_on=True)
    assert model.use_cpu_attention(dropout, jnp.float32, 16, cpu_kernels=True, dropout_on=False)  # evaluation
    assert model.attention_kernel(CFG, jnp.float32, cpu_kernels=True).startswith("gpt_jax C++ kernel")
    assert kernels.layer_norm_supported(jnp.float32, 32) and not kernels.layer_norm_supported(jnp.float32, 36)
    assert not kernels.layer_norm_supported(jnp.bfloat16, 32)


def test_train_steps_with_and_without_the_kernel_agree():
    from gpt_jax.config import Config, TrainConfig
    from gpt_jax.train_step import create_train_state, make_train_step

    losses = {}
    for use in (True, False):
        cfg = Config(model=CFG, train=TrainConfig(batch_size=4, learning_rate=1e-2, cpu_kernels=use))
        state, step = create_train_state(cfg), jax.jit(make_train_step(cfg))
        rng = np.random.default_rng(0)
        losses[use] = []
        for _ in range(4):
            x, y = (jnp.asarray(rng.integers(0, 65, (1, 4, 16), dtype=np.int32)) for _ in range(2))
            state, metrics = step(state, x, y)
            losses[use].append(float(metrics["loss"]))
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_without_a_compiler_the_model_warns_once_and_uses_xla(tmp_path):
    code = ("import jax.numpy as jnp; from gpt_jax import kernels, model, ModelConfig\n"
            "cfg = ModelConfig(vocab_size=65, block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.0)\n"
            "print(kernels.available(),\n"
            "      model.use_cpu_attention(cfg, jnp.float32, 16, cpu_kernels=True, dropout_on=False),\n"
            "      kernels.layer_norm_supported(jnp.float32, 32))")
    result = run_python(code, CXX="/nonexistent/c++", GPT_JAX_CACHE_DIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False", "False"]
    warning = [line for line in result.stderr.splitlines() if "kernels are not available" in line]
    assert len(warning) == 1 and "no C++ compiler" in warning[0] and "set CXX" in warning[0]
    assert list(tmp_path.iterdir()) == []


def test_the_build_is_cached_and_leaves_no_partial_files(tmp_path):
    code = "from gpt_jax import kernels; print(kernels.build())"
    first = run_python(code, GPT_JAX_CACHE_DIR=str(tmp_path))
    second = run_python(code, GPT_JAX_CACHE_DIR=str(tmp_path))
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert first.stdout == second.stdout
    assert [p.name for p in tmp_path.iterdir()] == [os.path.basename(first.stdout.strip())]
