"""Data parallelism: every mode on 8 simulated CPU devices trains like one device; several processes too."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from gpt_jax import checkpoint, config
from gpt_jax.errors import ConfigError
from gpt_jax.parallel import check_divisible, fsdp_spec

from conftest import REPO, run_script, tiny_overrides

TESTS = REPO / "tests"


def simulated(n: int) -> dict:
    return {"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}", "PYTHONPATH": f"{REPO}{os.pathsep}{TESTS}"}


def test_every_mode_matches_one_device(accumulation=2):  # accumulation inside every mode too
    result = run_script(TESTS / "dp_worker.py", accumulation, env=simulated(8), timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8
    ref = out["single"]
    assert ref["losses"][-1] < ref["losses"][0] - 0.2  # it learns
    for mode in ("sharding", "shard_map", "pmap", "fsdp"):
        np.testing.assert_allclose(out[mode]["losses"], ref["losses"], rtol=1e-5, err_msg=mode)
        # a gradient summed instead of averaged over devices shows here (Adam would hide it in the params)
        np.testing.assert_allclose(out[mode]["grad_norms"], ref["grad_norms"], rtol=1e-4, err_msg=mode)
        assert out[mode]["max_param_diff"] < 1e-5, mode


def test_batch_must_divide_over_devices():
    with pytest.raises(ConfigError, match=r"batch_size 10 does not divide over 4 devices; use --batch_size=8 or --batch_size=12"):
        check_divisible(10, 4)
    check_divisible(12, 4)


def test_fsdp_spec_picks_largest_divisible_axis():
    assert tuple(fsdp_spec((4, 32, 96), 8)) == (None, None, "data")
    assert tuple(fsdp_spec((65, 32), 8)) == (None, "data")
    assert tuple(fsdp_spec((65,), 8)) == ()


def test_train_script_reports_indivisible_batch(corpus, tmp_path):
    result = run_script("train.py", *tiny_overrides(corpus, tmp_path / "out", batch_size=6), env=simulated(4))
    assert result.returncode == 2
    assert result.stderr.strip() == "error: batch_size 6 does not divide over 4 devices; use --batch_size=4 or --batch_size=8"
    assert not (tmp_path / "out").exists()


def train_losses(out_dir):
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def test_two_processes_match_one_process_and_resume_in_one(corpus, tmp_path):
    one = tmp_path / "one"
    r1 = run_script("train.py", *tiny_overrides(corpus, one), env=simulated(4))
    assert r1.returncode == 0, r1.stderr[-2000:]
    two = tmp_path / "two"
    r2 = run_script("-m", "gpt_jax.launch", "-n", "2", "--devices_per_process", "2", "--",
                    "train.py", *tiny_overrides(corpus, two), timeout=300)
    assert r2.returncode == 0, r2.stdout[-3000:]
    assert "[0]" in r2.stdout and "process(es)" in r2.stdout
    np.testing.assert_allclose(train_losses(two), train_losses(one), rtol=1e-5)
    # the 2-process checkpoint resumes in one process
    r3 = run_script("train.py", *tiny_overrides(corpus, two, max_iters=12, lr_decay_iters=12), "--resume",
                    env=simulated(4))
    assert r3.returncode == 0, r3.stderr[-2000:]
    assert checkpoint.latest_step(two) == 12


def test_killing_one_process_stops_the_launcher(corpus, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "gpt_jax.launch", "-n", "2", "--devices_per_process", "1", "--",
                             "train.py", *tiny_overrides(corpus, out, max_iters=1_000_000, eval_interval=1_000_000)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (metrics.exists() and '"kind": "train"' in metrics.read_text()):
        time.sleep(0.2)
    children = []
    for entry in os.listdir("/proc"):
        try:
            cmdline = open(f"/proc/{entry}/cmdline").read().split("\0")
        except (OSError, ValueError):
            continue
        if "--process_id=1" in cmdline and f"--out_dir={out}" in cmdline:
            children.append(int(entry))
    assert children, "process 1 not found"
    killed_at = time.time()
    os.kill(children[0], signal.SIGKILL)
    proc.communicate(timeout=90)
    assert proc.returncode != 0
    assert time.time() - killed_at < 60


@pytest.mark.parametrize("process_id", [0, 1])
def test_peer_that_never_starts_is_a_clear_error(corpus, tmp_path, process_id):
    from gpt_jax.launch import free_port

    start = time.time()
    result = run_script("train.py", *tiny_overrides(corpus, tmp_path / "out"), f"--coordinator=127.0.0.1:{free_port()}",
                        "--num_processes=2", f"--process_id={process_id}", "--init_timeout=3", timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: jax.distributed did not start within 3 s: not all 2 processes joined")
    assert len(result.stderr.strip().splitlines()) == 1
    assert time.time() - start < 60
    assert not (tmp_path / "out").exists()
