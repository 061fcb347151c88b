"""scripts/gpu_check.sh --dry-run: every part of the GPU check runs here on the CPU at tiny sizes."""

import json
import os
import subprocess
import sys

from conftest import REPO
from gpt_jax import kernels


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check"
    result = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", f"--out={out}"], cwd=REPO,
                            capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["dry_run"] and results["errors"] == {}
    assert results["devices"]["matmul_tflops"] > 0 and results["devices"]["backend"] == "cpu"
    assert results["train"]["steps"] == 20 and results["train"]["best_val_loss"] < 4.17  # below ln(65): it learned
    gpt2 = results["gpt2_124m"]
    on_cpu = "gpt_jax C++ kernel" if kernels.available() else "XLA einsum"  # the CPU path the dry run takes
    assert gpt2["tokens_per_step"] == 2 * 64 and gpt2["mfu"] > 0 and gpt2["attention"].startswith(on_cpu)
    assert [r["batch"] for r in results["sample"]] == [1, 8] and all(r["same_tokens"] for r in results["sample"])
    table = result.stdout.strip().splitlines()[-9:]  # the table comes last
    assert [line.split("|")[0].strip() for line in table] == [
        "JAX / devices", "matmul peak", "shakespeare_char", "throughput", "gpt2_124m step", "MFU", "attention",
        "sample batch 1", "sample batch 8"]


def test_gpu_check_rejects_unknown_arguments():
    result = subprocess.run(["bash", "scripts/gpu_check.sh", "--dryrun"], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: unknown arguments ['--dryrun']; use --dry-run and --out=DIR")
