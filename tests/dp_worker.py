"""Run in a subprocess with simulated devices: train a tiny model 20 steps per mode and print JSON."""

import json
import sys

import jax
import numpy as np

from gpt_jax import config
from gpt_jax.parallel import MODES, make_data_parallel
from gpt_jax.train_step import create_train_state, make_train_step, with_vocab

from conftest import CORPUS, TINY
from gpt_jax.tokenizer import CharTokenizer


def run(cfg, mode):
    text = CORPUS.read_text()[:50_000]
    tokens = CharTokenizer(CORPUS.read_text()).encode(text)
    from gpt_jax.trainer import batch_for_step

    if mode == "single":
        step = jax.jit(make_train_step(cfg), device=None)
        state = jax.device_put(create_train_state(cfg), jax.devices()[0])
        place, unplace = (lambda x, y: (x, y)), (lambda s: s)
    else:
        dp = make_data_parallel(cfg, mode)
        step, state, place, unplace = dp.step, dp.init_state(), dp.place_batch, dp.checkpointable
    losses, grad_norms = [], []
    for s in range(20):
        state, metrics = step(state, *place(*batch_for_step(tokens, cfg, s)))
        losses.append(float(np.mean(jax.device_get(metrics["loss"]))))
        grad_norms.append(float(np.mean(jax.device_get(metrics["grad_norm"]))))
    return losses, grad_norms, jax.device_get(unplace(state).params)


if __name__ == "__main__":
    cfg = with_vocab(config.load(**{**TINY, "batch_size": 16, "gradient_accumulation_steps": int(sys.argv[1])}), 65)
    ref_losses, ref_norms, ref_params = run(cfg, "single")
    out = {"devices": jax.device_count(), "single": {"losses": ref_losses, "grad_norms": ref_norms}}
    for mode in MODES:
        losses, norms, params = run(cfg, mode)
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params)))
        out[mode] = {"losses": losses, "grad_norms": norms, "max_param_diff": diff}
    print(json.dumps(out))
