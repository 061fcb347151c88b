"""One-shot GPU check: matmul peak, a full shakespeare_char training, a GPT-2 124M step, KV-cache sampling.

    PYTHONPATH=. python scripts/gpu_check.py [--dry-run] [--out=DIR]     (or: bash scripts/gpu_check.sh)

Each part runs even when an earlier one failed; a short table comes last and the figures go to
DIR/results.json (default gpu_check_out/). `--dry-run` runs the same parts on whatever JAX finds (a CPU
here) at tiny sizes, so CI can keep the script working without a GPU. Needs only the packages of the
GPU image (jax, flax, optax, orbax, numpy): no install step, no network.
"""

import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gpt_jax.hostmem import keep_freed_memory  # noqa: E402

keep_freed_memory()  # before NumPy and JAX start their threads, as train.py does

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from gpt_jax import config  # noqa: E402
from gpt_jax.bench import bench_sample, bench_step  # noqa: E402
from gpt_jax.errors import first_line  # noqa: E402
from gpt_jax.fileio import write_atomic  # noqa: E402
from gpt_jax.metrics import MetricsLog, si  # noqa: E402
from gpt_jax.peak import measure_matmul_flops, peak_flops  # noqa: E402
from gpt_jax.train_step import compute_dtype  # noqa: E402

# Tiny sizes for --dry-run: the same code paths in seconds on a CPU.
DRY_TRAIN = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8", "--max_iters=20",
             "--eval_interval=10", "--eval_iters=2", "--warmup_iters=2", "--lr_decay_iters=20"]
DRY_GPT2 = ["--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=64", "--batch_size=2", "--vocab_size=512"]


def part_devices(dry_run: bool) -> dict:
    """1. JAX version, devices, and the measured matmul rate in the compute dtype (the practical peak)."""
    dtype = compute_dtype("auto")
    flops = measure_matmul_flops(256 if dry_run else 8192, dtype)
    datasheet, source = peak_flops()
    return {"jax": jax.__version__, "backend": jax.default_backend(), "devices": [d.device_kind for d in jax.devices()],
            "dtype": jnp.dtype(dtype).name, "matmul_tflops": flops / 1e12,
            "peak_tflops": datasheet / 1e12, "peak_source": source}


def part_train(out: Path, dry_run: bool) -> dict:
    """2. `python train.py configs/shakespeare_char.toml`: the full recipe, wall time and best val loss."""
    run_dir = out / "shakespeare_char"
    args = [sys.executable, "train.py", "configs/shakespeare_char.toml", f"--out_dir={run_dir}",
            *(DRY_TRAIN if dry_run else [])]
    if (run_dir / "checkpoints").exists():
        raise RuntimeError(f"{run_dir} holds an earlier run; remove it or choose another --out")
    start = time.perf_counter()
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (out / "train.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"train.py exited {result.returncode}: {result.stderr.strip().splitlines()[-1:]}")
    records = MetricsLog(run_dir / "metrics.jsonl").read()
    evals = [r for r in records if r["kind"] == "eval"]
    trains = [r for r in records if r["kind"] == "train"]
    best = min(evals, key=lambda r: r["val_loss"])
    return {"command": " ".join(["python", *args[1:]]), "wall_s": wall, "steps": evals[-1]["step"],
            "best_val_loss": best["val_loss"], "best_at_step": best["step"],
            "tokens_per_s": trains[-1]["tokens_per_s"] if trains else None,
            "mfu": trains[-1]["mfu"] if trains else None, "out_dir": str(run_dir)}


def part_gpt2(dry_run: bool) -> dict:
    """3. GPT-2 124M train step on random tokens: step time, tokens/s, MFU (datasheet and measured peak)."""
    overrides = config.parse_overrides(DRY_GPT2 if dry_run else [])
    cfg = config.load(REPO / "configs" / "gpt2_124m.toml", overrides)
    return bench_step(cfg, steps=3 if dry_run else 20)


def part_sample(train_out: str | None, dry_run: bool) -> list[dict]:
    """4. KV-cache sampling against naive recomputation on the checkpoint part 2 trained."""
    if train_out is None:
        raise RuntimeError("no checkpoint: the training part failed")
    return bench_sample(train_out, 8 if dry_run else 500, [1, 8])


def table(results: dict) -> str:
    """The closing summary, one line a figure."""
    def get(part, fmt):
        r = results.get(part)
        return "FAILED: " + results["errors"][part] if r is None else fmt(r)

    d, t, g = "devices", "train", "gpt2_124m"
    rows = [
        ("JAX / devices", get(d, lambda r: f"{r['jax']} / {len(r['devices'])} x {r['devices'][0]} ({r['backend']})")),
        ("matmul peak", get(d, lambda r: f"{si(r['matmul_tflops'] * 1e12, ' FLOP/s')} measured {r['dtype']}; "
                                          f"{si(r['peak_tflops'] * 1e12, ' FLOP/s')} {r['peak_source']}")),
        ("shakespeare_char", get(t, lambda r: f"{r['steps']} steps in {r['wall_s']:.1f} s wall (python train.py, "
                                               f"compile included); best val loss {r['best_val_loss']:.4f} at step {r['best_at_step']}")),
        ("  throughput", get(t, lambda r: f"{r['tokens_per_s']:,.0f} tokens/s, MFU {100 * r['mfu']:.1f}% (last log line)"
                                          if r["tokens_per_s"] else "n/a")),
        ("gpt2_124m step", get(g, lambda r: f"{r['step_ms']:.1f} ms, {r['tokens_per_s']:,.0f} tokens/s, "
                                             f"batch {r['tokens_per_step']:,} tokens, {r['dtype']}")),
        ("  MFU", get(g, lambda r: f"{100 * r['mfu']:.1f}% of {si(r['peak_tflops'] * 1e12, ' FLOP/s')} ({r['peak_source']}); "
                                   f"{100 * r['mfu_measured']:.1f}% of measured {si(r['measured_peak_tflops'] * 1e12, ' FLOP/s')}")),
        ("  attention", get(g, lambda r: r["attention"])),
    ]
    for row in results.get("sample") or []:
        rows.append((f"sample batch {row['batch']}", f"{row['max_new_tokens']} tokens: cached {row['cached_tokens_per_s']:,.0f} "
                     f"tokens/s vs naive {row['naive_tokens_per_s']:,.0f} ({row['speedup']:.1f}x, block {row['block_size']}, "
                     f"same tokens {row['same_tokens']})"))
    if results.get("sample") is None:
        rows.append(("sampling", "FAILED: " + results["errors"]["sample"]))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)} | {value}" for name, value in rows)


def main(argv: list[str]) -> int:
    dry_run = "--dry-run" in argv
    out = Path(next((a.split("=", 1)[1] for a in argv if a.startswith("--out=")), "gpu_check_out"))
    unknown = [a for a in argv if a != "--dry-run" and not a.startswith("--out=")]
    if unknown:
        print(f"error: unknown arguments {unknown}; use --dry-run and --out=DIR", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "dry_run": dry_run, "errors": {}}
    started = time.perf_counter()
    parts = (("devices", lambda: part_devices(dry_run)), ("train", lambda: part_train(out, dry_run)),
             ("gpt2_124m", lambda: part_gpt2(dry_run)),
             ("sample", lambda: part_sample((results.get("train") or {}).get("out_dir"), dry_run)))
    for name, run in parts:
        print(f"== {name}", flush=True)
        part_start = time.perf_counter()
        try:
            results[name] = run()
            print(json.dumps(results[name], default=str), flush=True)
            print(f"== {name}: {time.perf_counter() - part_start:.1f} s", flush=True)
        except Exception as e:  # noqa: BLE001 - record it, keep going, fail at the end
            traceback.print_exc()
            results[name] = None
            results["errors"][name] = first_line(e)
    results["total_s"] = time.perf_counter() - started
    write_atomic(out / "results.json", json.dumps(results, indent=1, default=str).encode())
    print(f"\ngpu_check{' --dry-run' if dry_run else ''}: {results['date']}, {results['total_s']:.0f} s in all; "
          f"{out / 'results.json'}")
    print(table(results))
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
