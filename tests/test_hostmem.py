"""gpt_jax.hostmem: after keep_freed_memory() a train step stops page-faulting its temporary buffer in again."""

import json

from conftest import run_script

PROBE = """
import json, resource, sys
if sys.argv[1] == "keep":
    from gpt_jax.hostmem import keep_freed_memory
    assert keep_freed_memory()
import jax, jax.numpy as jnp
from gpt_jax import config
from gpt_jax.train_step import create_train_state, make_train_step, with_vocab
cfg = with_vocab(config.load(config.REPO_ROOT / "configs" / "shakespeare_char_cpu.toml"), 65)
x = jnp.zeros((1, cfg.train.batch_size, cfg.model.block_size), jnp.int32)
state = create_train_state(cfg)
step = jax.jit(make_train_step(cfg)).lower(state, x, x).compile()
temp_pages = step.memory_analysis().temp_size_in_bytes // 4096
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(step(state, x, x))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"temp_pages": temp_pages, "faults": faults}))
"""


def probe(mode: str) -> dict:
    result = run_script("-c", PROBE, mode)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused_instead_of_faulted_in_again():
    default, kept = probe("default"), probe("keep")
    assert default["temp_pages"] > 8192  # the buffer is larger than glibc's 32 MB mmap threshold
    steady = lambda r: sorted(r["faults"][2:])[1]  # noqa: E731 - a low steady-state step after warm-up
    assert steady(default) > default["temp_pages"] // 2  # glibc returned it: faulted in again every step
    assert steady(kept) < kept["temp_pages"] // 10
