"""The training loop: config -> data -> state -> jitted steps -> metrics -> checkpoints.

Read top to bottom: `train` prepares everything, then each step runs the compiled `train_step` on the
batch of that step (prepared ahead on a host thread), reads the previous step's metrics (one step late, so
the host never waits for the device in the hot loop), evaluates and checkpoints every `eval_interval`.
"""

import dataclasses
import math
import os
import signal
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from gpt_jax import checkpoint, data
from gpt_jax.config import REPO_ROOT, Config
from gpt_jax.errors import CheckpointError, ConfigError, DataError, TrainingDiverged
from gpt_jax.metrics import MetricsLog, plot_losses, si
from gpt_jax.model import count_params, flops_per_token
from gpt_jax.peak import peak_flops
from gpt_jax.tokenizer import CharTokenizer
from gpt_jax.parallel import make_data_parallel
from gpt_jax.train_step import TrainState, compute_dtype, make_eval_step, with_vocab


def resolve_path(path: str) -> Path:
    """Relative paths in configs are taken from the repository root, then from the working directory."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p if (REPO_ROOT / p).exists() else p


def check_out_dir(out_dir: Path) -> None:
    """out_dir must be a writable folder (or creatable); checked before anything is written."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out_dir {out_dir} is a file, not a folder; choose another --out_dir")
    parent = out_dir if out_dir.exists() else next(p for p in out_dir.absolute().parents if p.exists())
    try:
        if not os.access(parent, os.W_OK | os.X_OK):
            raise PermissionError(parent)
        with tempfile.TemporaryFile(dir=parent):  # root passes os.access everywhere: try a write, leave nothing
            pass
    except OSError:
        raise ConfigError(f"out_dir {out_dir} is not writable; choose another --out_dir") from None


def model_differences(saved: dict, cfg: Config) -> list[str]:
    """'field: checkpoint X, config Y' for each model field that differs from a checkpoint's config."""
    current = dataclasses.asdict(cfg.model)
    return [f"{k}: checkpoint {saved.get(k)!r}, config {v!r}" for k, v in current.items() if saved.get(k) != v]


def batch_for_step(tokens: np.ndarray, cfg: Config, step: int, rows: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
    """The training batch of `step`, shaped (A, B, T) for A accumulation micro-steps; `rows` picks this
    process's rows of every micro-batch (the global batch depends on seed and step alone)."""
    A, B, T = cfg.train.gradient_accumulation_steps, cfg.train.batch_size, cfg.model.block_size
    index_AB = np.arange(A * B).reshape(A, B)[:, rows]  # (A, B_local) rows of the flat (A*B) batch
    x, y = data.get_batch(tokens, cfg.train.seed, step, A * B, T, rows=index_AB.ravel())
    return x.reshape(index_AB.shape + (T,)), y.reshape(index_AB.shape + (T,))


def step_of(state: TrainState) -> int:
    """The optimizer step of a state (pmap keeps one copy per device)."""
    return int(np.asarray(jax.device_get(state.step)).reshape(-1)[0])


def evaluate(eval_step, params, dataset: data.Dataset, cfg: Config) -> dict[str, float]:
    """Mean loss on both splits over eval_iters batches that are the same at every evaluation."""
    out = {}
    for split, tokens in (("train", dataset.train), ("val", dataset.val)):
        losses = [
            eval_step(params, *data.get_batch(tokens, cfg.train.seed, i, cfg.train.batch_size, cfg.model.block_size,
                                              stream=data.EVAL_STREAM))
            for i in range(cfg.train.eval_iters)
        ]
        out[f"{split}_loss"] = float(jnp.mean(jnp.stack(losses)))
    return out


class StopRequest:
    """Turns SIGINT / SIGTERM into a flag the loop checks after each step (the step finishes, then saves)."""

    def __init__(self):
        self.signal_name = None

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)


def train(cfg: Config, *, resume: bool = False, log=print, progress: bool = True) -> dict:
    """Run (or resume) training as configured; returns a summary dict. Raises GPTJaxError on bad input."""
    out_dir = Path(cfg.train.out_dir)
    check_out_dir(out_dir)
    dataset = data.prepare(resolve_path(cfg.train.dataset))
    cfg = with_vocab(cfg, dataset.tokenizer.vocab_size)
    if cfg.model.vocab_size < dataset.tokenizer.vocab_size:
        raise ConfigError(f"vocab_size {cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{dataset.tokenizer.vocab_size}; leave vocab_size unset")
    for split in ("train", "val"):  # checked before anything is written
        data.check_block_size(getattr(dataset, split), cfg.model.block_size, f"the {split}")
    dp = make_data_parallel(cfg)
    main = jax.process_index() == 0  # only process 0 prints, logs and plots
    log = log if main else (lambda *a: None)
    progress = progress and main
    meta = {"best_val_loss": math.inf}
    if resume:
        _, saved_meta = checkpoint.read_meta(out_dir)
        diffs = model_differences(saved_meta["config"], cfg)
        if diffs:
            raise CheckpointError(f"the checkpoint's model differs from the config ({'; '.join(diffs)}); "
                                  f"resume with the checkpoint's settings")
        if CharTokenizer.from_json(saved_meta["tokenizer"]) != dataset.tokenizer:
            raise CheckpointError("the checkpoint's tokenizer differs from the dataset's; resume with the same --dataset")
        state, meta = checkpoint.restore(out_dir, "latest", dp.restore_target())
        state = dp.place_state(state)
    elif checkpoint.latest_step(out_dir) is not None:
        raise CheckpointError(f"{out_dir} already holds a checkpoint (step {checkpoint.latest_step(out_dir)}); "
                              f"continue it with --resume, or choose another --out_dir")
    else:
        state = dp.init_state()
    out_dir.mkdir(parents=True, exist_ok=True)
    start_step = step_of(state)
    metrics_log = MetricsLog(out_dir / "metrics.jsonl" if main else os.devnull)
    if main:  # drop records of work a kill lost (all of them for a fresh start in a used folder)
        metrics_log.truncate_after(start_step if resume else -1)

    tokens_per_step = cfg.tokens_per_step
    flops_token = flops_per_token(cfg.model)
    peak_per_device, peak_source = peak_flops(cfg.train.peak_tflops)
    peak = peak_per_device * dp.n_devices  # MFU of the whole job
    devices = jax.devices()
    log(f"devices: {len(devices)} x {devices[0].device_kind} ({jax.default_backend()}) in {jax.process_count()} "
        f"process(es), --parallel={dp.mode}; peak {si(peak_per_device, 'FLOP/s')} per device ({peak_source})")
    params = dp.checkpointable(state).params
    log(f"model: {count_params(params) / 1e6:.2f}M parameters (non-embedding), "
        f"{count_params(params, False) / 1e6:.2f}M total; {si(flops_token)} FLOPs/token; "
        f"{tokens_per_step:,} tokens/step; compute dtype {jnp.dtype(compute_dtype(cfg.train.dtype)).name}")
    if resume:
        log(f"resuming from step {start_step} of {cfg.train.max_iters}")

    eval_step = jax.jit(make_eval_step(cfg))

    saved_at = {"latest": start_step} if resume else {}  # in memory: every process makes the same orbax calls

    def save(kind: str, state: TrainState) -> None:
        if saved_at.get(kind) == step_of(state):
            return  # already saved at this step
        saved_at[kind] = step_of(state)
        meta_out = {**meta, "config": cfg.to_dict(), "tokenizer": dataset.tokenizer.to_json(), "step": step_of(state)}
        checkpoint.save(out_dir, kind, int(step_of(state)), dp.checkpointable(state), meta_out)

    def run_eval(step: int) -> None:
        """Evaluate, log, plot, and checkpoint (latest, and best when val improved)."""
        nonlocal paused_s
        started = time.perf_counter()
        losses = evaluate(eval_step, dp.checkpointable(state).params, dataset, cfg)
        metrics_log.write({"kind": "eval", "step": step, **losses})
        if main:
            plot_losses(metrics_log.read(), out_dir / "loss.png")
        improved = losses["val_loss"] < meta["best_val_loss"]
        if improved:
            meta["best_val_loss"] = losses["val_loss"]
        (bar.write if progress else log)(f"step {step}: train loss {losses['train_loss']:.4f}, val loss {losses['val_loss']:.4f}"
                  + (" (best)" if improved else ""))
        if step > 0:
            if improved:
                save("best", state)
            if improved or cfg.train.always_save_checkpoint:
                save("latest", state)
        paused_s += time.perf_counter() - started  # throughput counts training steps only

    steps = range(start_step, cfg.train.max_iters)
    rows = dp.local_rows()
    batches = data.prefetch(lambda s: batch_for_step(dataset.train, cfg, s, rows), steps, cfg.train.prefetch)
    bar = tqdm(total=cfg.train.max_iters, initial=start_step, disable=not progress, dynamic_ncols=True,
               unit="step", mininterval=0.5)
    wall_start = time.perf_counter()
    timed_from, timed_steps, stopped_by, paused_s = None, 0, None, 0.0
    pending = None  # (step, metrics on device) of the previous step

    def train_rate(now: float) -> float:
        """Training tokens/s since the first step, evaluations and checkpoints excluded."""
        return timed_steps * tokens_per_step / (now - timed_from - paused_s) if timed_steps else 0.0

    def read_metrics(pending) -> None:
        nonlocal timed_from, timed_steps
        step, metrics = pending
        metrics = {k: float(np.mean(v)) for k, v in jax.device_get(metrics).items()}  # pmap: one per device
        if not math.isfinite(metrics["loss"]):
            raise TrainingDiverged(f"loss is {metrics['loss']} at step {step}; stopped, the last good checkpoint "
                                   f"is kept. Lower --learning_rate or set --grad_clip")
        now = time.perf_counter()
        if timed_from is None:  # the first step includes compilation: time from its end
            timed_from = now - paused_s  # offsets pauses so far (the step-0 evaluation): only later ones count
        else:
            timed_steps += 1
        rate = train_rate(now)
        mfu = rate * flops_token / peak
        bar.set_postfix_str(f"loss {metrics['loss']:.4f} | {si(rate)} tok/s | MFU {100 * mfu:.1f}%", refresh=False)
        bar.update(1)
        if step % cfg.train.log_interval == 0:
            metrics_log.write({"kind": "train", "step": step, **metrics, "tokens_per_s": rate, "mfu": mfu,
                               "tokens_seen": (step + 1) * tokens_per_step})

    with StopRequest() as stop, bar:  # the bar closes before any error line is printed
        if start_step == 0:
            run_eval(0)
        for step, (x_ABT, y_ABT) in zip(steps, batches):
            state, metrics = dp.step(state, *dp.place_batch(x_ABT, y_ABT))
            if pending is not None:
                read_metrics(pending)
            pending = (step, metrics)
            done = step + 1
            at_eval = done % cfg.train.eval_interval == 0 or done == cfg.train.max_iters
            if at_eval or stop.signal_name:
                read_metrics(pending)  # a NaN here stops before anything is saved
                pending = None
            if at_eval:
                run_eval(done)
            if stop.signal_name:
                if not at_eval or not cfg.train.always_save_checkpoint:
                    save("latest", state)
                stopped_by = stop.signal_name
                break
        if pending is not None:
            read_metrics(pending)

    wall = time.perf_counter() - wall_start
    rate = train_rate(time.perf_counter())
    summary = {"steps": step_of(state), "best_val_loss": meta["best_val_loss"], "wall_s": wall,
               "tokens_per_s": rate, "mfu": rate * flops_token / peak, "stopped_by": stopped_by}
    if stopped_by:
        log(f"{stopped_by}: saved step {step_of(state)}; continue with: python train.py ... --out_dir={out_dir} --resume")
    else:
        log(f"done: {summary['steps']} steps, best val loss {summary['best_val_loss']:.4f}, wall {wall:.1f} s, "
            f"{si(rate)} tokens/s, MFU {100 * summary['mfu']:.1f}%")
    return summary
