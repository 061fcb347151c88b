import jax
import numpy as np
import pytest
from flax import traverse_util

from gpt_jax import ModelConfig, config, init_params
from gpt_jax.optim import decay_mask, lr_schedule


def test_schedule_warmup_peak_end():
    cfg = config.load(learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, lr_decay_iters=5000).train
    lr = lr_schedule(cfg)
    assert float(lr(0)) == pytest.approx(1e-3 / 101, rel=1e-5)  # float32
    assert float(lr(50)) == pytest.approx(1e-3 / 101 + 0.5 * (1e-3 - 1e-3 / 101), rel=1e-5)
    assert float(lr(100)) == pytest.approx(1e-3)
    assert float(lr(2550)) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4), rel=1e-4)  # cosine midpoint
    assert float(lr(5000)) == pytest.approx(1e-4)
    assert float(lr(9000)) == pytest.approx(1e-4)
    assert float(lr_schedule(config.load(decay_lr=False).train)(1234)) == pytest.approx(1e-3)


def test_decay_mask_by_rank_not_names():
    cfg = ModelConfig(vocab_size=65, block_size=16, n_layer=3, n_head=2, n_embd=32, bias=True)
    flat = traverse_util.flatten_dict(decay_mask(init_params(jax.random.key(0), cfg)))
    decayed = sorted("/".join(p) for p, v in flat.items() if v)
    assert decayed == ["blocks/attn/w_out", "blocks/attn/w_qkv", "blocks/mlp/w_fc", "blocks/mlp/w_proj", "wpe", "wte"]
    assert not flat[("blocks", "ln_1", "scale")]  # (L, D): a stacked vector, no decay
    assert not flat[("ln_f", "scale")] and not flat[("blocks", "attn", "b_qkv")]
