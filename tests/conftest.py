"""Shared fixtures: a small corpus, tiny configs, and a way to run the scripts as a user would."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "data" / "tinyshakespeare.txt"

# Tiny settings that train in seconds on 2 CPU cores.
TINY = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "dropout": 0.0, "batch_size": 8,
        "eval_iters": 2, "eval_interval": 5, "log_interval": 1, "max_iters": 10, "warmup_iters": 2,
        "lr_decay_iters": 10, "prefetch": 1}


@pytest.fixture
def corpus(tmp_path) -> Path:
    """The first 20,000 characters of tiny Shakespeare, in a temporary folder."""
    path = tmp_path / "corpus" / "shakespeare.txt"
    path.parent.mkdir()
    path.write_text(CORPUS.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    return path


def tiny_overrides(corpus: Path, out_dir: Path, **extra) -> list[str]:
    values = {**TINY, "dataset": str(corpus), "out_dir": str(out_dir), **extra}
    return [f"--{k}={v}" for k, v in values.items()]


def run_script(*args, timeout=300, env=None) -> subprocess.CompletedProcess:
    """Run `python <args>` from the repository root, as a user would."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
