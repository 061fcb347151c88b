"""Benchmarks that print figures (never asserted in tests).

    python -m gpt_jax.bench step [CONFIG.toml] [--key=value ...] [--steps=N] [--peak_tflops=X]
    python -m gpt_jax.bench sample [--out_dir=DIR] [--max_new_tokens=500] [--batch_sizes=1,8]
    python -m gpt_jax.bench scaling [...]    # data-parallel sweep: see gpt_jax/bench_parallel.py
    python -m gpt_jax.bench compile [CONFIG.toml] [--layers=2,6,12,24]

`step` times the jitted train step on random tokens: compile time, then the median of timed steps after
warm-up (block_until_ready), tokens/s, achieved TFLOP/s and MFU against the peak (datasheet on accelerators;
on CPU the fp32 matmul rate measured in the same process). `sample` compares KV-cache generation with
nanoGPT-style recomputation on a trained checkpoint.
"""

import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

from gpt_jax.hostmem import keep_freed_memory

if __name__ == "__main__":
    keep_freed_memory()  # as train.py does, before NumPy and JAX start their threads: see gpt_jax/hostmem.py

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gpt_jax import config  # noqa: E402
from gpt_jax.cli import run_main  # noqa: E402
from gpt_jax.errors import ConfigError  # noqa: E402
from gpt_jax.model import attention_kernel, flops_per_token  # noqa: E402
from gpt_jax.fileio import write_atomic  # noqa: E402
from gpt_jax.peak import measure_matmul_flops, peak_flops  # noqa: E402
from gpt_jax.parallel import check_divisible, make_data_parallel  # noqa: E402
from gpt_jax.train_step import compute_dtype, create_train_state, make_train_step, wants_cpu_kernels, with_vocab  # noqa: E402


def _timed(fn, *args):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


def bench_step(cfg: config.Config, steps: int = 20, warmup: int = 3) -> dict:
    """Time the train step of `cfg` on random tokens; returns the figures as a dict."""
    cfg = with_vocab(cfg, 65)
    A, B, T = cfg.train.gradient_accumulation_steps, cfg.train.batch_size, cfg.model.block_size
    rng = np.random.default_rng(0)
    x = rng.integers(0, cfg.model.vocab_size, (A, B, T), dtype=np.int32)
    y = rng.integers(0, cfg.model.vocab_size, (A, B, T), dtype=np.int32)
    dp = make_data_parallel(cfg)  # --parallel=... over every visible device (one device: plain jit)
    state = dp.init_state()
    x, y = dp.place_batch(x, y)
    start = time.perf_counter()
    compiled = dp.step.lower(state, x, y).compile()
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
        state, _ = _timed(compiled, state, x, y)[0]
    times = []
    for _ in range(steps):
        (state, _), dt = _timed(compiled, state, x, y)
        times.append(dt)
    dtype = compute_dtype(cfg.train.dtype)
    on_cpu = jax.default_backend() == "cpu"
    measured = measure_matmul_flops(2048 if on_cpu else 8192, dtype)  # this machine's practical peak, same run
    dtype_name = jnp.dtype(dtype).name
    if cfg.train.peak_tflops > 0 or not on_cpu:
        peak, source = peak_flops(cfg.train.peak_tflops)
    else:
        peak, source = measured, f"{dtype_name} matmul measured in this run"
    median = statistics.median(times)
    tokens = A * B * T
    flops = flops_per_token(cfg.model) * tokens / median / dp.n_devices  # per device, like the peak
    return {"step_ms": 1e3 * median, "compile_s": compile_s, "tokens_per_s": tokens / median,
            "achieved_tflops": flops / 1e12, "peak_tflops": peak / 1e12, "peak_source": source, "mfu": flops / peak,
            "measured_peak_tflops": measured / 1e12, "mfu_measured": flops / measured, "dtype": dtype_name,
            "attention": attention_kernel(cfg.model, dtype, B // dp.n_devices,
                                          cpu_kernels=wants_cpu_kernels(cfg, per_device=dp.mode in ("shard_map", "pmap"))),
            "tokens_per_step": tokens,
            "steps_timed": steps, "device": jax.devices()[0].device_kind, "devices": dp.n_devices, "parallel": dp.mode}


def bench_sample(out_dir: str, max_new_tokens: int, batch_sizes: list[int], seed: int = 0) -> list[dict]:
    """Tokens/s of cached generation and of naive recomputation, each timed after a compiling run."""
    from gpt_jax.generate import generate, generate_naive, load_model

    params, cfg, tokenizer = load_model(out_dir)
    rows = []
    for B in batch_sizes:
        prompt = jnp.asarray(np.tile(tokenizer.encode("\n"), (B, 1)))
        row = {"batch": B, "max_new_tokens": max_new_tokens, "block_size": cfg.block_size}
        for name, fn in (("cached", generate), ("naive", generate_naive)):
            run = lambda: fn(params, cfg, prompt, jax.random.key(seed), max_new_tokens, top_k=1)  # noqa: E731
            jax.block_until_ready(run())  # compile (naive: once per context length)
            out, dt = _timed(run)
            row[f"{name}_tokens_per_s"] = B * max_new_tokens / dt
            row[f"{name}_tokens"] = np.asarray(out)
        row["same_tokens"] = bool(np.array_equal(row.pop("cached_tokens"), row.pop("naive_tokens")))
        row["speedup"] = row["cached_tokens_per_s"] / row["naive_tokens_per_s"]
        rows.append(row)
    return rows


def compile_times(cfg, layers: list[int]) -> list[dict]:
    """Seconds to lower and compile the train step as n_layer grows, with the layer scan kept (nearly flat)
    and unrolled (`unroll_layers`, the default: grows with depth)."""
    rows = []
    for n in layers:
        row = {"n_layer": n}
        for key, unroll in (("scanned_s", False), ("unrolled_s", True)):
            c = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_layer=n),
                                    train=dataclasses.replace(cfg.train, unroll_layers=unroll))
            state = jax.eval_shape(lambda: create_train_state(c))
            x = jax.ShapeDtypeStruct((1, c.train.batch_size, c.model.block_size), np.int32)
            start = time.perf_counter()
            jax.jit(make_train_step(c)).lower(state, x, x).compile()
            row[key] = time.perf_counter() - start
        rows.append(row)
    return rows


def compile_report(rows: list[dict]) -> str:
    """One line per depth."""
    return "\n".join(f"compile time, n_layer {row['n_layer']:>2}: {row['scanned_s']:.1f} s with the layer scan, "
                     f"{row['unrolled_s']:.1f} s unrolled" for row in rows)


def _take(argv: list[str], key: str, default: str) -> str:
    for a in list(argv):
        if a.startswith(f"--{key}="):
            argv.remove(a)
            return a.split("=", 1)[1]
    return default


def parallel_main(command: str, argv: list[str]) -> int:
    """`scaling`: the data-parallel sweep (gpt_jax.bench_parallel); `compile`: compile time against depth."""
    from gpt_jax import bench_parallel

    layers = [int(n) for n in _take(argv, "layers", "2,6,12,24").split(",")]
    if command == "compile":
        path = argv.pop(0) if argv and not argv[0].startswith("--") else "configs/shakespeare_char_cpu.toml"
        cfg = with_vocab(config.load(config.REPO_ROOT / path, config.parse_overrides(argv)), 65)
        print(compile_report(compile_times(cfg, layers)))
        return 0
    devices = [int(n) for n in _take(argv, "devices", "1,2,4,8").split(",")]
    processes = [int(n) for n in _take(argv, "processes", "2,4").split(",") if n]
    modes = _take(argv, "modes", "sharding,shard_map,pmap,fsdp").split(",")
    per_device_batch = int(_take(argv, "per_device_batch", "4"))
    steps = int(_take(argv, "steps", "4"))
    out = Path(_take(argv, "out", "bench_out"))
    if not argv or argv[0].startswith("--"):
        argv.insert(0, str(config.REPO_ROOT / "configs" / "shakespeare_char_cpu.toml"))
    cfg = config.load(argv[0], config.parse_overrides(argv[1:]))  # validate before starting subprocesses
    for p in devices:
        check_divisible(per_device_batch * max(devices), p)  # the strong-scaling batch splits over every count
    results = bench_parallel.sweep(argv, devices, processes, modes, per_device_batch, steps)
    results["compile"] = compile_times(with_vocab(cfg, 65), layers)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "results.json", json.dumps(results, indent=1).encode())
    bench_parallel.plot(results, out)
    print(bench_parallel.report(results))
    print(compile_report(results["compile"]))
    print(f"wrote {out / 'results.json'}, {out / 'step_breakdown.png'}, {out / 'efficiency.png'}")
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("step", "sample", "scaling", "compile"):
        raise ConfigError("usage: python -m gpt_jax.bench {step,sample,scaling,compile} [...]; see the module docstring")
    command, argv = argv[0], list(argv[1:])
    if command in ("scaling", "compile"):
        return parallel_main(command, argv)
    if command == "step":
        steps = int(_take(argv, "steps", "20"))
        path = argv.pop(0) if argv and not argv[0].startswith("--") else "configs/shakespeare_char_cpu.toml"
        cfg = config.load(config.REPO_ROOT / path if not path.startswith("/") else path, config.parse_overrides(argv))
        r = bench_step(cfg, steps=steps)
        print(f"{path} on {r['devices']} x {r['device']} (--parallel={r['parallel']}): compile {r['compile_s']:.1f} s | step {r['step_ms']:.1f} ms (median of "
              f"{r['steps_timed']}) | {r['tokens_per_s']:,.0f} tokens/s | {r['achieved_tflops'] * 1e3:.1f} GFLOP/s per device | "
              f"peak {r['peak_tflops'] * 1e3:.1f} GFLOP/s ({r['peak_source']}) | MFU {100 * r['mfu']:.1f}%"
              + ("" if r["peak_source"].endswith("in this run") else
                 f" | measured {r['dtype']} matmul {r['measured_peak_tflops'] * 1e3:.1f} GFLOP/s, MFU {100 * r['mfu_measured']:.1f}%")
              + f" | {r['dtype']}, attention: {r['attention']}")
        return 0
    out_dir = _take(argv, "out_dir", "out-shakespeare-char")
    max_new = int(_take(argv, "max_new_tokens", "500"))
    batches = [int(b) for b in _take(argv, "batch_sizes", "1,8").split(",")]
    if argv:
        raise ConfigError(f"unknown arguments {argv}; sample takes --out_dir, --max_new_tokens, --batch_sizes")
    for r in bench_sample(out_dir, max_new, batches):
        print(f"batch {r['batch']}, {r['max_new_tokens']} new tokens (block_size {r['block_size']}): cached "
              f"{r['cached_tokens_per_s']:,.0f} tokens/s | naive {r['naive_tokens_per_s']:,.0f} tokens/s | "
              f"speed-up {r['speedup']:.1f}x | same tokens: {r['same_tokens']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
