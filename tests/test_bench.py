"""Smoke tests of the benchmark commands: they run and report sane figures (no timing assertions)."""

import json

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


def test_scaling_sweep_smoke(tmp_path):
    out = tmp_path / "bench"
    result = run_script("-m", "gpt_jax.bench", "scaling", "--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=16",
                        "--devices=1,2", "--processes=", "--steps=2", "--per_device_batch=2", "--layers=1,2",
                        f"--out={out}", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "simulated on the same CPU cores" in result.stdout
    results = json.loads((out / "results.json").read_text())
    assert [pt["devices"] for pt in results["points"]] == [1, 2]
    for pt in results["points"]:
        assert pt["weak"]["batch_size"] == 2 * pt["devices"] and pt["strong"]["batch_size"] == 4
        assert pt["allreduce_grads_ms"] > 0 and pt["grad_bytes"] > 0 and len(pt["allreduce_sizes"]) == 4
        for scaling, modes in (("weak", ("sharding", "shard_map", "pmap", "fsdp")), ("strong", ("sharding", "shard_map"))):
            row = pt[scaling]
            assert row["no_allreduce_ms"] > 0
            for mode in modes:
                r = row[mode]
                assert r["step_ms"] > 0 and r["compile_s"] > 0 and r["tokens_per_s"] > 0 and r["efficiency"] > 0
                assert abs(r["overhead_ms"] - (r["step_ms"] - row["no_allreduce_ms"])) < 1e-9
                assert abs(r["overhead_share"] - r["overhead_ms"] / r["step_ms"]) < 1e-9
    assert results["points"][0]["weak"]["sharding"]["efficiency"] == 1.0
    assert results["allreduce_fit"]["samples"] == 4 and results["allreduce_fit"]["bandwidth_bytes_per_s"] != 0
    assert [r["n_layer"] for r in results["compile"]] == [1, 2]
    assert all(r["scanned_s"] > 0 and r["unrolled_s"] > 0 for r in results["compile"])
    for png in ("step_breakdown.png", "efficiency.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
