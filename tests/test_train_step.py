import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax import config
from gpt_jax.train_step import create_train_state, make_eval_step, make_train_step, with_vocab

from conftest import TINY


def tiny_cfg(**extra):
    return with_vocab(config.load(**{**TINY, **extra}), 65)


def batch(A, B, T, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 65, (A, B, T), dtype=np.int32)
    return x, np.roll(x, -1, axis=-1)


def test_accumulation_equals_large_batch():
    big = tiny_cfg(batch_size=8, gradient_accumulation_steps=1)
    acc = tiny_cfg(batch_size=2, gradient_accumulation_steps=4)
    x, y = batch(1, 8, 16)
    s_big, m_big = jax.jit(make_train_step(big))(create_train_state(big), x, y)
    s_acc, m_acc = jax.jit(make_train_step(acc))(create_train_state(acc), x.reshape(4, 2, 16), y.reshape(4, 2, 16))
    np.testing.assert_allclose(m_big["loss"], m_acc["loss"], rtol=1e-6)
    np.testing.assert_allclose(m_big["grad_norm"], m_acc["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s_big.params), jax.tree.leaves(s_acc.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # Adam amplifies float noise near zero


@pytest.mark.parametrize("use_jit", [False, True])
def test_step_lowers_loss_and_counts(use_jit):
    cfg = tiny_cfg()
    step = make_train_step(cfg)
    step = jax.jit(step, donate_argnums=0) if use_jit else step
    state = create_train_state(cfg)
    x, y = batch(1, 8, 16)
    losses = []
    for _ in range(5):
        state, metrics = step(state, x, y)
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 5 and losses[-1] < losses[0]
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))


def test_dropout_keys_differ_per_step_but_are_reproducible():
    cfg = tiny_cfg(dropout=0.5)
    step = jax.jit(make_train_step(cfg))
    x, y = batch(1, 8, 16)
    s1, m1 = step(create_train_state(cfg), x, y)
    s2, m2 = step(create_train_state(cfg), x, y)
    assert float(m1["loss"]) == float(m2["loss"])
    _, m3 = step(s1, x, y)
    _, m3_eval = step(s1.replace(step=s1.step * 0), x, y)
    assert float(m3["loss"]) != float(m3_eval["loss"])  # the key folds in the step


def test_eval_step_is_deterministic():
    cfg = tiny_cfg(dropout=0.5)
    state = create_train_state(cfg)
    x, y = batch(1, 8, 16)
    ev = jax.jit(make_eval_step(cfg))
    assert float(ev(state.params, x[0], y[0])) == float(ev(state.params, x[0], y[0]))
