"""Faults and bad input: one line, exit 2, no traceback, and existing checkpoints left byte-identical."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gpt_jax import checkpoint, config
from gpt_jax.errors import CheckpointError
from gpt_jax.generate import load_model

from conftest import REPO, run_script, tiny_overrides


def snapshot(out_dir):
    return {p.relative_to(out_dir): p.read_bytes() for p in sorted(out_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run whose checkpoints every bad command must leave alone."""
    root = tmp_path_factory.mktemp("faults")
    corpus = root / "corpus.txt"
    corpus.write_text((REPO / "data" / "tinyshakespeare.txt").read_text()[:20_000])
    out = root / "out"
    result = run_script("train.py", *tiny_overrides(corpus, out, max_iters=5))
    assert result.returncode == 0, result.stderr
    return root, corpus, out


def bad_inputs(root, corpus, out):
    """(script args, expected start of the error line) for each user mistake."""
    ok = lambda **kw: tiny_overrides(corpus, out, **kw)  # noqa: E731
    (root / "bad.toml").write_text("n_layer = 2\nn_head = = 2\n")
    (root / "empty.txt").write_text("")
    (root / "latin1.txt").write_bytes("Fair Verona, caf\xe9".encode("latin-1"))
    (root / "a_file").write_text("x")
    (root / "short.txt").write_text("To be or not to be, " * 5)
    return [
        (["train.py", "configs/missing.toml", *ok()], "error: config file not found: configs/missing.toml"),
        (["train.py", str(root / "bad.toml"), *ok()], "error: " + str(root / "bad.toml") + ": TOML syntax error: Invalid value (at line 2"),
        (["train.py", *ok(), "--learnig_rate=1"], "error: unknown config key 'learnig_rate': did you mean 'learning_rate'?"),
        (["train.py", *ok(), "--batch_size=eight"], "error: --batch_size=eight: expected int"),
        (["train.py", *ok(), "--n_embd=30", "--n_head=4"], "error: n_embd (30) must be divisible by n_head (4)"),
        (["train.py", *ok(), "--n_layer=0"], "error: n_layer must be positive"),
        (["train.py", *ok(), "--resume", "--block_size=4000"], "error: the val split has 2000 tokens, too few for block_size 4000"),
        (["train.py", *ok(), f"--dataset={root / 'empty.txt'}"], f"error: {root / 'empty.txt'} is empty"),
        (["train.py", *ok(), f"--dataset={root / 'latin1.txt'}"], f"error: {root / 'latin1.txt'} is not valid UTF-8: byte 0xe9 at offset 16"),
        (["train.py", *ok(), f"--dataset={root / 'nope.txt'}"], f"error: dataset not found: {root / 'nope.txt'}"),
        (["train.py", *tiny_overrides(corpus, root / "a_file")], f"error: out_dir {root / 'a_file'} is a file"),
        (["train.py", *tiny_overrides(corpus, "/proc/gpt_jax_out")], "error: out_dir /proc/gpt_jax_out is not writable"),
        (["train.py", *tiny_overrides(corpus, root / "fresh"), "--resume"], "error: no checkpoint in"),
        (["train.py", *ok(n_layer=3, n_embd=48), "--resume"],
         "error: the checkpoint's model differs from the config (n_layer: checkpoint 2, config 3; n_embd: checkpoint 32, config 48)"),
        (["train.py", *ok()], "error: " + str(out) + " already holds a checkpoint (step 5)"),
        (["train.py", *ok(batch_size=6)], "error: batch_size 6 does not divide over 4 devices"),
        (["sample.py", f"--out_dir={out}", "--start=Aé"], "error: 1 character(s) not in the model's vocabulary: 'é'"),
        (["sample.py", f"--out_dir={root / 'fresh'}"], "error: no checkpoint in"),
    ]


def test_bad_input_matrix(trained):
    root, corpus, out = trained
    before = snapshot(out)
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}  # for the batch-divisibility case
    for args, expected in bad_inputs(root, corpus, out):
        result = run_script(*args, env=env)
        assert result.returncode == 2, (args, result.stderr[-1500:])
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, (args, result.stderr[-1500:])
        assert lines[0].startswith(expected), (args, lines[0])
    assert snapshot(out) == before
    assert not (root / "fresh").exists()


def test_debug_shows_the_traceback(trained):
    root, corpus, out = trained
    result = run_script("train.py", *tiny_overrides(corpus, out), "--n_layer=0", "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_damaged_checkpoint_is_a_clear_error(trained, tmp_path):
    import shutil

    root, corpus, _ = trained
    out = tmp_path / "copy"
    shutil.copytree(trained[2], out)
    step_dir = out / "checkpoints" / "latest" / "5" / "state"
    for path in step_dir.rglob("*"):
        if path.is_file() and path.stat().st_size > 100:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncate the array data
    result = run_script("train.py", *tiny_overrides(corpus, out, max_iters=8), "--resume")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: checkpoint {out / 'checkpoints' / 'latest' / '5'} cannot be loaded")


def test_disk_full_during_save_keeps_the_previous_checkpoint(trained, tmp_path, monkeypatch):
    import shutil

    from gpt_jax.trainer import train

    root, corpus, _ = trained
    out = tmp_path / "copy"
    shutil.copytree(trained[2], out)
    before = snapshot(out / "checkpoints")  # metrics and the plot move on; the checkpoints must not

    def full_disk(self, *args, **kwargs):
        raise ValueError("RESOURCE_EXHAUSTED: Failed to write 12484 bytes: No space left on device [os_error_code='28']")

    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
    overrides = config.parse_overrides(tiny_overrides(corpus, out, max_iters=10))
    with pytest.raises(CheckpointError, match=r"could not save the (best|latest) checkpoint at step 10 .*no space left on device"):
        train(config.load(overrides=overrides), resume=True, log=lambda *a: None, progress=False)
    monkeypatch.undo()
    assert snapshot(out / "checkpoints") == before
    params, cfg, _ = load_model(out, "latest")
    assert checkpoint.latest_step(out) == 5 and cfg.n_layer == 2


def run_until_done_with_kills(corpus, out, rng, max_iters):
    """Start train.py, kill -9 it at random moments, resume until it finishes; returns the number of kills."""
    kills = 0
    while True:
        resume = ["--resume"] if checkpoint.latest_step(out) is not None else []
        proc = subprocess.Popen([sys.executable, "train.py", *tiny_overrides(corpus, out, max_iters=max_iters,
                                                                               eval_interval=2, dropout=0.1), *resume],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if kills < 2:
            time.sleep(rng.uniform(2.5, 5.0))  # start-up, compile, steps and saves every 2 steps: a run takes > 7 s
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                kills += 1
                continue
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        return kills


@pytest.fixture(scope="module")
def uninterrupted(trained):
    root, corpus, _ = trained
    reference = root / "reference"
    result = run_script("train.py", *tiny_overrides(corpus, reference, max_iters=KILL_RUN_STEPS, eval_interval=2,
                                                    dropout=0.1))
    assert result.returncode == 0, result.stderr[-2000:]
    return reference


KILL_RUN_STEPS = 40


@pytest.mark.parametrize("seed", [0, 1])
def test_kill_9_at_random_moments_then_resume_is_bit_identical(trained, uninterrupted, tmp_path, seed):
    root, corpus, _ = trained
    reference = uninterrupted
    killed = tmp_path / "killed"
    kills = run_until_done_with_kills(corpus, killed, random.Random(seed), KILL_RUN_STEPS)
    assert kills >= 1
    a, _, _ = load_model(reference, "latest")
    b, _, _ = load_model(killed, "latest")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == sorted(set(steps))
