"""Smoke tests of the benchmark commands: they run and report sane figures (no timing assertions)."""

from gpt_jax import config
from gpt_jax.bench import bench_sample, bench_step

from conftest import TINY, run_script, tiny_overrides


def test_bench_step_reports_consistent_figures():
    r = bench_step(config.load(**TINY), steps=2, warmup=1)
    assert r["step_ms"] > 0 and r["compile_s"] > 0 and r["peak_tflops"] > 0
    assert abs(r["tokens_per_s"] - r["tokens_per_step"] / (r["step_ms"] / 1e3)) < 1e-6 * r["tokens_per_s"]
    assert abs(r["mfu"] - r["achieved_tflops"] / r["peak_tflops"]) < 1e-9


def test_bench_sample_cached_matches_naive(corpus, tmp_path):
    out = tmp_path / "out"
    assert run_script("train.py", *tiny_overrides(corpus, out)).returncode == 0
    rows = bench_sample(str(out), max_new_tokens=20, batch_sizes=[1, 2])
    assert [r["batch"] for r in rows] == [1, 2]
    assert all(r["same_tokens"] and r["cached_tokens_per_s"] > 0 and r["naive_tokens_per_s"] > 0 for r in rows)
