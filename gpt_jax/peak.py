"""Peak FLOP/s for MFU: a datasheet table for accelerators, a measured matmul rate on CPUs."""

import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from gpt_jax.fileio import write_atomic

# Dense bf16 tensor-core TFLOP/s from the vendors' datasheets (no sparsity). Checked in order: the first
# substring of the device kind that matches wins, so longer names come first.
DATASHEET_TFLOPS = (
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("A10G", 125.0), ("L40S", 362.0),
    ("L4", 121.0), ("V100", 125.0), ("RTX 4090", 165.0), ("TPU v5p", 459.0), ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0), ("TPU v4", 275.0), ("TPU v6", 918.0),
)


def measure_matmul_flops(n: int = 2048, dtype=jnp.float32, repeats: int = 10) -> float:
    """FLOP/s of an n x n x n matmul on the default device: the best of `repeats` timed runs after warm-up."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def _cpu_cache_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpt_jax" / "cpu_peak.json"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_flops(override_tflops: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from).

    An override wins; accelerators use DATASHEET_TFLOPS; a CPU's fp32 matmul rate is measured once and
    cached per (CPU, core count, JAX version) in ~/.cache/gpt_jax/cpu_peak.json.
    """
    if override_tflops > 0:
        return override_tflops * 1e12, "--peak_tflops"
    device = jax.devices()[0]
    if device.platform != "cpu":
        for name, tflops in DATASHEET_TFLOPS:
            if name.lower() in device.device_kind.lower():
                return tflops * 1e12, f"datasheet bf16 peak of {name}"
        return measure_matmul_flops(8192, jnp.bfloat16), f"measured bf16 matmul ({device.device_kind} not in table)"
    key = f"{_cpu_name()}|{os.cpu_count()}|jax {jax.__version__}|{jax.device_count()} devices"
    path = _cpu_cache_path()
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached["flops"], "measured fp32 matmul (cached)"
    except (OSError, ValueError):
        pass
    flops = measure_matmul_flops()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps({"key": key, "flops": flops}).encode())
    except OSError:
        pass  # a read-only home only costs a re-measurement next time
    return flops, "measured fp32 matmul"
