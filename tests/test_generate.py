import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax import ConfigError, ModelConfig, init_params
from gpt_jax.generate import filter_logits, generate, generate_naive

from conftest import run_script, tiny_overrides

CFG = ModelConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)


@pytest.fixture(scope="module")
def params():
    return init_params(jax.random.key(0), CFG)


@pytest.mark.parametrize("prompt_len", [3, 16, 21])  # shorter than, equal to and longer than block_size
def test_cached_equals_naive_greedy(params, prompt_len):
    prompt = jax.random.randint(jax.random.key(1), (3, prompt_len), 0, 65)
    cached = generate(params, CFG, prompt, jax.random.key(2), 30, top_k=1)
    naive = generate_naive(params, CFG, prompt, jax.random.key(2), 30, top_k=1)
    assert cached.shape == (3, prompt_len + 30)
    np.testing.assert_array_equal(cached[:, :prompt_len], prompt)
    np.testing.assert_array_equal(cached, naive)


def test_cached_equals_naive_sampling_and_is_reproducible(params):
    prompt = jnp.zeros((2, 4), jnp.int32)
    kw = dict(temperature=0.9, top_k=20, top_p=0.95)
    a = generate(params, CFG, prompt, jax.random.key(5), 24, **kw)
    np.testing.assert_array_equal(a, generate(params, CFG, prompt, jax.random.key(5), 24, **kw))
    np.testing.assert_array_equal(a, generate_naive(params, CFG, prompt, jax.random.key(5), 24, **kw))
    assert not np.array_equal(a, generate(params, CFG, prompt, jax.random.key(6), 24, **kw))


def test_top_k_never_samples_outside_the_k_largest():
    logits = jax.random.normal(jax.random.key(0), (1, 65)) * 3
    allowed = set(np.argsort(-np.asarray(logits[0]))[:5].tolist())
    draws = jax.random.categorical(jax.random.key(1), filter_logits(logits, 1.0, top_k=5), shape=(4000, 1))
    assert set(np.asarray(draws).ravel().tolist()) == allowed


def test_top_p_never_samples_outside_the_nucleus():
    probs = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    logits = jnp.log(jnp.asarray(probs))[None, :]
    for p, nucleus in [(0.5, {0}), (0.6, {0, 1}), (0.7, {0, 1}), (0.8, {0, 1, 2}), (0.9, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3, 4})]:
        draws = jax.random.categorical(jax.random.key(1), filter_logits(logits, 1.0, top_p=p), shape=(3000, 1))
        assert set(np.asarray(draws).ravel().tolist()) == nucleus, p


@pytest.mark.parametrize("kw, message", [
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"top_p": 0.0}, "top_p must be in (0, 1]"),
    ({"top_p": 1.5}, "top_p must be in (0, 1]"),
    ({"top_k": 0}, "top_k must be >= 1"),
])
def test_bad_sampling_settings(params, kw, message):
    with pytest.raises(ConfigError) as info:
        generate(params, CFG, jnp.zeros((1, 2), jnp.int32), jax.random.key(0), 4, **kw)
    assert message in str(info.value)


def test_sample_script_end_to_end(corpus, tmp_path):
    out = tmp_path / "out"
    assert run_script("train.py", *tiny_overrides(corpus, out)).returncode == 0
    result = run_script("sample.py", f"--out_dir={out}", "--start=ROMEO:", "--num_samples=2", "--max_new_tokens=40",
                        "--seed=3")
    assert result.returncode == 0, result.stderr
    samples = result.stdout.split("---------------\n")
    assert len(samples) == 3 and samples[-1] == ""
    assert all(s.startswith("ROMEO:") and len(s) == len("ROMEO:") + 40 + 1 for s in samples[:2])
    again = run_script("sample.py", f"--out_dir={out}", "--start=ROMEO:", "--num_samples=2", "--max_new_tokens=40",
                       "--seed=3")
    assert again.stdout == result.stdout
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("MENENIUS")
    from_file = run_script("sample.py", f"--out_dir={out}", f"--start=FILE:{prompt_file}", "--num_samples=1",
                           "--max_new_tokens=5", "--top_k=1")
    assert from_file.returncode == 0 and from_file.stdout.startswith("MENENIUS")

    for args, message in [
        ([f"--out_dir={tmp_path / 'none'}"], "error: no checkpoint in"),
        (["--start=Aé€"], "error: 2 character(s) not in the model's vocabulary: 'é', '€'"),
        (["--temperature=0"], "error: temperature must be > 0"),
        (["--top_p=1.5"], "error: top_p must be in (0, 1]"),
        (["--num_sample=3"], "error: unrecognized arguments: --num_sample=3"),
    ]:
        bad = run_script("sample.py", f"--out_dir={out}", *args)
        assert bad.returncode == 2, args
        assert bad.stderr.startswith(message) and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
