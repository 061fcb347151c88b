"""The training loop, in process and as `python train.py`."""

import json

import jax
import numpy as np
import pytest

from gpt_jax import checkpoint, config
from gpt_jax.errors import CheckpointError, TrainingDiverged
from gpt_jax.trainer import train
from gpt_jax.train_step import create_train_state, with_vocab

from conftest import TINY, run_script, tiny_overrides


def tiny(corpus, out_dir, **extra):
    return config.load(**{**TINY, "dataset": str(corpus), "out_dir": str(out_dir), **extra})


def quiet_train(cfg, **kw):
    return train(cfg, log=lambda *a: None, progress=False, **kw)


def restore_params(out_dir, cfg, kind="latest"):
    cfg = with_vocab(cfg, json.loads(checkpoint.read_meta(out_dir, kind)[1]["tokenizer"])["chars"].__len__())
    state, meta = checkpoint.restore(out_dir, kind, create_train_state(cfg))
    return state, meta


def test_exact_resume(corpus, tmp_path):
    full = tiny(corpus, tmp_path / "full", dropout=0.1)
    quiet_train(full)
    part = tiny(corpus, tmp_path / "part", dropout=0.1, max_iters=5)  # stops at 5, same schedule
    quiet_train(part)
    assert checkpoint.latest_step(tmp_path / "part") == 5
    quiet_train(tiny(corpus, tmp_path / "part", dropout=0.1), resume=True)
    a, meta_a = restore_params(tmp_path / "full", full)
    b, meta_b = restore_params(tmp_path / "part", full)
    assert int(a.step) == int(b.step) == 10
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)  # bit-identical
    assert meta_a["best_val_loss"] == meta_b["best_val_loss"]
    steps = [r["step"] for r in map(json.loads, (tmp_path / "part" / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    assert steps == sorted(set(steps))  # no duplicated records after the resume


def test_refuses_to_overwrite_and_checks_shape_on_resume(corpus, tmp_path):
    cfg = tiny(corpus, tmp_path / "run", max_iters=5)
    quiet_train(cfg)
    before = {p: p.read_bytes() for p in (tmp_path / "run" / "checkpoints").rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match="already holds a checkpoint.*--resume"):
        quiet_train(cfg)
    with pytest.raises(CheckpointError, match="n_layer: checkpoint 2, config 3"):
        quiet_train(tiny(corpus, tmp_path / "run", n_layer=3), resume=True)
    after = {p: p.read_bytes() for p in (tmp_path / "run" / "checkpoints").rglob("*") if p.is_file()}
    assert before == after
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        quiet_train(tiny(corpus, tmp_path / "empty"), resume=True)


def test_nan_stops_and_keeps_last_good_checkpoint(corpus, tmp_path):
    cfg = tiny(corpus, tmp_path / "run", max_iters=5)
    quiet_train(cfg)
    good = restore_params(tmp_path / "run", cfg)[0]
    with pytest.raises(TrainingDiverged, match=r"loss is (nan|inf) at step \d+"):
        quiet_train(tiny(corpus, tmp_path / "run", max_iters=40, learning_rate=1e9, min_lr=0.0, grad_clip=0.0,
                         warmup_iters=0), resume=True)
    assert checkpoint.latest_step(tmp_path / "run") == 5
    kept = restore_params(tmp_path / "run", cfg)[0]
    for x, y in zip(jax.tree.leaves(good), jax.tree.leaves(kept)):
        np.testing.assert_array_equal(x, y)


def test_train_script_end_to_end(corpus, tmp_path):
    out = tmp_path / "out"
    result = run_script("train.py", "configs/shakespeare_char_cpu.toml", *tiny_overrides(corpus, out))
    assert result.returncode == 0, result.stderr
    assert "done: 10 steps" in result.stdout
    assert checkpoint.latest_step(out) == 10 and checkpoint.latest_step(out, "best") is not None
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} == {"train", "eval"}
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state, meta = restore_params(out, tiny(corpus, out))
    assert int(state.step) == 10 and meta["config"]["n_layer"] == 2


@pytest.mark.parametrize("args, message", [
    (["configs/nope.toml"], "error: config file not found: configs/nope.toml"),
    (["--n_layr=3"], "error: unknown config key 'n_layr': did you mean 'n_layer'?"),
    (["--max_iters=ten"], "error: --max_iters=ten: expected int"),
    (["--n_embd=100", "--n_head=3"], "error: n_embd (100) must be divisible by n_head (3)"),
])
def test_train_script_bad_input(tmp_path, args, message):
    result = run_script("train.py", *args, f"--out_dir={tmp_path / 'out'}")
    assert result.returncode == 2
    assert result.stderr.strip() == message or result.stderr.strip().startswith(message)
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_train_help_lists_keys():
    result = run_script("train.py", "--help")
    assert result.returncode == 0
    for key in ("n_layer", "learning_rate", "gradient_accumulation_steps", "dtype", "out_dir"):
        assert f"--{key}" in result.stdout


def test_sigterm_finishes_the_step_saves_and_exits_0(corpus, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "train.py", *tiny_overrides(corpus, out, max_iters=100000, eval_interval=100000)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and '"kind": "train"' in metrics.read_text()):
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "SIGTERM: saved step" in stdout and "--resume" in stdout
    step = checkpoint.latest_step(out)
    assert step is not None and step > 0
