"""Data-parallel scaling benchmark: step time per device count and mode, and what synchronizing costs.

    python -m gpt_jax.bench scaling [CONFIG.toml] [--key=value ...] [--devices=1,2,4,8] [--processes=2,4]
        [--modes=sharding,shard_map,pmap,fsdp] [--per_device_batch=4] [--steps=4] [--out=bench_out]

For each device count (on a CPU-only machine, a subprocess with that many simulated devices) and mode:
the full train step; the same step without the gradient all-reduce (shard_map with local gradients: not a
valid update, it isolates compute); the all-reduce alone on a pytree shaped like the gradients and on
single arrays of several sizes; overhead = full - no-all-reduce. Weak scaling keeps the batch per device,
strong scaling the global batch. A ring all-reduce model t = alpha + beta * 2(p-1)/p * bytes is fitted to the
all-reduce times. Writes results.json and two PNG plots to --out.
"""

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from gpt_jax.hostmem import keep_freed_memory

if __name__ == "__main__":  # a measured point (`_point`): allocate as train.py does, before NumPy and JAX start
    keep_freed_memory()

import numpy as np  # noqa: E402

SIMULATED_NOTE = ("devices are simulated on the same CPU cores: the mechanics and the synchronization overhead are "
                  "real, the speed-up is not (all 'devices' share 2 cores)")
ALLREDUCE_SIZES = (2**12, 2**16, 2**20, 2**22)  # float32 elements per message
ALLREDUCE_REPEATS = 20  # all-reduces are cheap to repeat: more samples, steadier fit
STRONG_MODES = ("sharding", "shard_map")


def _median_time(run, steps: int, warmup: int) -> float:
    import jax

    for _ in range(warmup):
        jax.block_until_ready(run())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _time_train_step(cfg, mode: str, steps: int, warmup: int, all_reduce: bool = True) -> dict:
    import jax

    from gpt_jax.parallel import make_data_parallel

    dp = make_data_parallel(cfg, mode, all_reduce=all_reduce)
    A, B, T = cfg.train.gradient_accumulation_steps, cfg.train.batch_size, cfg.model.block_size
    x = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (A, B, T), dtype=np.int32)[:, dp.local_rows()]
    x, y = dp.place_batch(x, x)
    holder = {"state": dp.init_state()}
    start = time.perf_counter()
    compiled = dp.step.lower(holder["state"], x, y).compile()
    compile_s = time.perf_counter() - start

    def run():
        holder["state"], metrics = compiled(holder["state"], x, y)
        return metrics

    seconds = _median_time(run, steps, warmup)
    return {"step_ms": 1e3 * seconds, "compile_s": compile_s, "tokens_per_s": A * B * T / seconds}


def _time_allreduce(shapes: list[tuple[int, ...]], steps: int, warmup: int) -> float:
    """Median seconds of a pmean over all devices of float32 arrays of these shapes."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()), ("data",))
    make = jax.jit(lambda: [jnp.ones(s, jnp.float32) for s in shapes], out_shardings=NamedSharding(mesh, P()))
    arrays = make()
    reduce = jax.jit(jax.shard_map(lambda t: jax.lax.pmean(t, "data"), mesh=mesh, in_specs=P(), out_specs=P(),
                                   check_vma=False))
    return _median_time(lambda: reduce(arrays), steps, warmup)


def measure_point(cfg, modes: list[str], per_device_batch: int, global_batch: int, steps: int, warmup: int) -> dict:
    """All measurements at this process's device count (one subprocess of the sweep)."""
    import jax

    from gpt_jax.model import init_params

    p = jax.device_count()
    point = {"devices": p, "processes": jax.process_count(), "weak": {}, "strong": {}}
    for scaling, batch in (("weak", per_device_batch * p), ("strong", global_batch)):  # strong: sharding, shard_map
        if scaling == "strong" and batch == point["weak"]["batch_size"]:  # the same runs: measured once
            point["strong"] = {k: dict(v) if isinstance(v, dict) else v for k, v in point["weak"].items()
                               if k in STRONG_MODES or not isinstance(v, dict)}
            continue
        c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=batch))
        row = {"batch_size": batch}
        for mode in modes:
            if mode == "pmap" and (jax.process_count() > 1 or not hasattr(jax, "pmap")):
                continue
            if scaling == "strong" and mode not in STRONG_MODES:
                continue  # compile time is the sweep's main cost: strong scaling for the two DP step kinds
            row[mode] = _time_train_step(c, mode, steps, warmup)
        row["no_allreduce_ms"] = _time_train_step(c, "shard_map", steps, warmup, all_reduce=False)["step_ms"]
        for mode in modes:
            if mode in row:
                row[mode]["overhead_ms"] = row[mode]["step_ms"] - row["no_allreduce_ms"]
                row[mode]["overhead_share"] = row[mode]["overhead_ms"] / row[mode]["step_ms"]
        point[scaling] = row
    grad_shapes = [a.shape for a in jax.tree.leaves(jax.eval_shape(lambda k: init_params(k, cfg.model), jax.random.key(0)))]
    point["grad_bytes"] = 4 * sum(int(np.prod(s)) for s in grad_shapes)
    repeats = max(steps, ALLREDUCE_REPEATS)
    point["allreduce_grads_ms"] = 1e3 * _time_allreduce(grad_shapes, repeats, warmup)
    point["allreduce_sizes"] = [{"bytes": 4 * n, "ms": 1e3 * _time_allreduce([(n,)], repeats, warmup)}
                                for n in ALLREDUCE_SIZES]
    return point


def fit_allreduce(points: list[dict]) -> dict | None:
    """Least-squares alpha, beta of t = alpha + beta * 2(p-1)/p * bytes over points with p > 1."""
    xs, ts = [], []
    for pt in points:
        p = pt["devices"]
        for m in pt["allreduce_sizes"] if p > 1 else []:
            xs.append(2 * (p - 1) / p * m["bytes"])
            ts.append(m["ms"] / 1e3)
    if len(xs) < 2:
        return None
    beta, alpha = np.polyfit(np.array(xs), np.array(ts), 1)
    return {"alpha_s": float(alpha), "beta_s_per_byte": float(beta),
            "bandwidth_bytes_per_s": float(1 / beta) if beta > 0 else float("inf"), "samples": len(xs)}


def add_efficiency(points: list[dict], modes: list[str]) -> None:
    """Weak: tokens/s(p) / (p x tokens/s(p0) / p0). Strong: step(p0) x p0 / (p x step(p)). p0 = smallest p."""
    base = min(points, key=lambda pt: pt["devices"])
    for pt in points:
        ratio = pt["devices"] / base["devices"]
        for mode in modes:
            if mode in pt["weak"] and mode in base["weak"]:
                pt["weak"][mode]["efficiency"] = pt["weak"][mode]["tokens_per_s"] / (ratio * base["weak"][mode]["tokens_per_s"])
            if mode in pt["strong"] and mode in base["strong"]:
                pt["strong"][mode]["efficiency"] = base["strong"][mode]["step_ms"] / (ratio * pt["strong"][mode]["step_ms"])


def _run_point(command: list[str], env: dict) -> dict:
    result = subprocess.run([sys.executable, *command], capture_output=True, text=True, env={**os.environ, **env})
    for line in result.stdout.splitlines():
        line = line.split("] ", 1)[1] if line.startswith("[") else line  # the launcher's [i] prefix
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"benchmark point failed: {' '.join(command)}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")


def sweep(config_args: list[str], devices: list[int], processes: list[int], modes: list[str], per_device_batch: int,
          steps: int, warmup: int = 1) -> dict:
    """Run every point in its own subprocess; returns the results dict (also what results.json holds)."""
    global_batch = per_device_batch * max(devices)

    def point_args(point_modes: list[str]) -> list[str]:
        return ["-m", "gpt_jax.bench_parallel", "_point", *config_args, f"--modes={','.join(point_modes)}",
                f"--per_device_batch={per_device_batch}", f"--global_batch={global_batch}", f"--steps={steps}",
                f"--warmup={warmup}"]

    flags = lambda n: {"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}  # noqa: E731
    points = [_run_point(point_args(modes), flags(p)) for p in devices]
    # Across processes the explicit-all-reduce step alone: what these points add is a real inter-process
    # all-reduce, and 4 processes compiling on 2 cores cost minutes per extra mode.
    mp_modes = ["shard_map"] if "shard_map" in modes else [m for m in modes if m != "pmap"][:1]
    mp_points = [_run_point(["-m", "gpt_jax.launch", "-n", str(n), "--", *point_args(mp_modes)], flags(1))
                 for n in processes]
    add_efficiency(points, modes)
    return {"config": config_args, "modes": modes, "per_device_batch": per_device_batch, "global_batch": global_batch,
            "simulated": True, "note": SIMULATED_NOTE, "points": points, "multiprocess_points": mp_points,
            "allreduce_fit": fit_allreduce(points), "multiprocess_allreduce_fit": fit_allreduce(mp_points)}


def report(results: dict) -> str:
    """The table printed on stdout."""
    lines = [f"NOTE: {results['note']}",
             f"{'devices':>7} {'scaling':>7} {'mode':>9} {'batch':>5} {'step ms':>9} {'no-AR ms':>9} {'sync ms':>8} "
             f"{'sync %':>6} {'tokens/s':>10} {'eff.':>5}"]
    for pt in results["points"] + results["multiprocess_points"]:
        label = f"{pt['devices']}" + (f" ({pt['processes']}p)" if pt["processes"] > 1 else "")
        for scaling in ("weak", "strong"):
            row = pt[scaling]
            for mode in results["modes"]:
                if mode not in row:
                    continue
                r = row[mode]
                eff = f"{r['efficiency']:.2f}" if "efficiency" in r else "-"
                lines.append(f"{label:>7} {scaling:>7} {mode:>9} {row['batch_size']:>5} {r['step_ms']:>9.1f} "
                             f"{row['no_allreduce_ms']:>9.1f} {r['overhead_ms']:>8.1f} {100 * r['overhead_share']:>5.0f}% "
                             f"{r['tokens_per_s']:>10,.0f} {eff:>5}")
        lines.append(f"{label:>7} all-reduce of the gradients ({pt['grad_bytes'] / 1e6:.2f} MB): {pt['allreduce_grads_ms']:.2f} ms")
    for key, title in (("allreduce_fit", "simulated devices, one process"), ("multiprocess_allreduce_fit", "processes over loopback")):
        fit = results.get(key)
        if fit:
            lines.append(f"ring all-reduce fit ({title}): alpha = {1e6 * fit['alpha_s']:.1f} us, effective bandwidth "
                         f"1/beta = {fit['bandwidth_bytes_per_s'] / 1e9:.2f} GB/s ({fit['samples']} samples)")
    return "\n".join(lines)


def plot(results: dict, out: Path) -> None:
    """step_breakdown.png (compute vs synchronization per device count) and efficiency.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gpt_jax.fileio import write_atomic

    def save(fig, name):
        import io

        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        write_atomic(out / name, buffer.getvalue())

    points = results["points"]
    ps = [pt["devices"] for pt in points]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    for ax, scaling in zip(axes, ("weak", "strong")):
        compute = [pt[scaling]["no_allreduce_ms"] for pt in points]
        sync = [max(0.0, pt[scaling]["shard_map"]["overhead_ms"]) if "shard_map" in pt[scaling] else 0 for pt in points]
        labels = [str(p) for p in ps]
        ax.bar(labels, compute, label="step without all-reduce")
        ax.bar(labels, sync, bottom=compute, label="gradient all-reduce (shard_map full - no-AR)")
        ax.set_title(f"{scaling} scaling")
        ax.set_xlabel("simulated devices")
        ax.set_ylabel("ms per step")
        ax.legend(fontsize=8)
    fig.suptitle("simulated devices share 2 CPU cores: overhead is real, speed-up is not", fontsize=9)
    save(fig, "step_breakdown.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    for scaling, style in (("weak", "o-"), ("strong", "s--")):
        for mode in results["modes"]:
            effs = [pt[scaling].get(mode, {}).get("efficiency") for pt in points]
            if all(e is not None for e in effs):
                ax.plot(ps, effs, style, label=f"{mode} ({scaling})")
    ax.set_xlabel("simulated devices")
    ax.set_ylabel("scaling efficiency")
    ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, "efficiency.png")


def _point_main(argv: list[str]) -> int:
    from gpt_jax import config
    from gpt_jax.parallel import init_distributed

    opts = config.parse_overrides([a for a in argv if a.startswith("--")])
    launch = {k: opts.pop(k) for k in ("coordinator", "num_processes", "process_id") if k in opts}
    init_distributed(launch.get("coordinator"), int(launch["num_processes"]) if launch else None,
                     int(launch["process_id"]) if launch else None, timeout_s=120)
    import jax

    from gpt_jax.train_step import with_vocab

    modes = opts.pop("modes").split(",")
    numbers = {k: int(opts.pop(k)) for k in ("per_device_batch", "global_batch", "steps", "warmup")}
    paths = [a for a in argv if not a.startswith("--")]
    cfg = with_vocab(config.load(paths[0] if paths else None, opts), 65)
    point = measure_point(cfg, modes, numbers["per_device_batch"], numbers["global_batch"], numbers["steps"],
                          numbers["warmup"])
    if jax.process_index() == 0:
        print("RESULT " + json.dumps(point), flush=True)
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["_point"]:
    from gpt_jax.cli import run_main

    sys.exit(run_main(_point_main, sys.argv[2:]))
