"""Data: corpus -> char tokens on disk (uint16) -> batch(seed, step). NumPy only, no JAX.

`prepare` writes, next to the corpus in `<stem>_char/`, `train.bin` (first 90% of the tokens), `val.bin`
(last 10%), `tokenizer.json` and `meta.json` (the corpus' sha256); each written atomically and reused while
the corpus is unchanged. `get_batch` is a pure function of its arguments: the batch at a step depends on
(seed, step) alone, so any device count, process count or resume sees the same data.
"""

import dataclasses
import hashlib
import json
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from gpt_jax.errors import DataError
from gpt_jax.fileio import write_atomic
from gpt_jax.tokenizer import CharTokenizer

TRAIN_FRACTION = 0.9
TRAIN_STREAM, EVAL_STREAM = 0, 1  # RNG streams: training batches vs the fixed evaluation batches


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Memory-mapped token ids of both splits and the tokenizer that made them."""

    train: np.ndarray  # (N_train,) uint16
    val: np.ndarray  # (N_val,) uint16
    tokenizer: CharTokenizer


def decode_corpus(path: Path, raw: bytes) -> str:
    """The corpus bytes as text; DataError if empty or not UTF-8 (naming the byte offset)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8: byte 0x{raw[e.start]:02x} at offset {e.start}; re-encode the file as UTF-8") from None
    if not text:
        raise DataError(f"{path} is empty; point --dataset at a non-empty text file")
    return text


def prepare(corpus_path: str | Path, data_dir: str | Path | None = None) -> Dataset:
    """Tokenize the corpus once (reused while it is unchanged) and memory-map both splits."""
    corpus_path = Path(corpus_path)
    data_dir = Path(data_dir) if data_dir is not None else corpus_path.parent / f"{corpus_path.stem}_char"
    if not corpus_path.is_file():
        raise DataError(f"dataset not found: {corpus_path}; set --dataset to a UTF-8 text file")
    raw = corpus_path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    meta_path = data_dir / "meta.json"
    if not _is_prepared(meta_path, digest):
        text = decode_corpus(corpus_path, raw)
        tokenizer = CharTokenizer.from_text(text)
        ids = tokenizer.encode(text)  # (N,) uint16
        n_train = int(len(ids) * TRAIN_FRACTION)
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(f"cannot create {data_dir} for the token files ({e.strerror}); make it writable") from None
        write_atomic(data_dir / "train.bin", ids[:n_train].tobytes())
        write_atomic(data_dir / "val.bin", ids[n_train:].tobytes())
        tokenizer.save(data_dir / "tokenizer.json")
        meta = {"corpus_sha256": digest, "train_tokens": n_train, "val_tokens": len(ids) - n_train}
        write_atomic(meta_path, json.dumps(meta).encode())  # written last: its presence means "complete"
    return Dataset(
        train=np.memmap(data_dir / "train.bin", dtype=np.uint16, mode="r"),
        val=np.memmap(data_dir / "val.bin", dtype=np.uint16, mode="r"),
        tokenizer=CharTokenizer.load(data_dir / "tokenizer.json"),
    )


def _is_prepared(meta_path: Path, digest: str) -> bool:
    try:
        meta = json.loads(meta_path.read_text())
        sizes_ok = all(
            (meta_path.parent / f"{split}.bin").stat().st_size == 2 * meta[f"{split}_tokens"] for split in ("train", "val")
        )
        return meta["corpus_sha256"] == digest and sizes_ok and (meta_path.parent / "tokenizer.json").is_file()
    except (OSError, ValueError, KeyError):
        return False


def check_block_size(tokens: np.ndarray, block_size: int, split: str = "a") -> None:
    """DataError unless the split holds more than block_size tokens (one window plus its target)."""
    if len(tokens) <= block_size:
        raise DataError(
            f"{split} split has {len(tokens)} tokens, too few for block_size {block_size}; "
            f"use --block_size={max(1, len(tokens) // 2)} or less, or a larger corpus"
        )


def get_batch(tokens: np.ndarray, seed: int, step: int, batch_size: int, block_size: int, *,
              stream: int = TRAIN_STREAM, rows: slice | np.ndarray = slice(None)) -> tuple[np.ndarray, np.ndarray]:
    """The batch of `step`: a pure function of its arguments.

    Args:
      tokens: (N,) token ids (a memmap is fine).
      seed, step, stream: pick the random windows; `stream` separates training from evaluation batches.
      batch_size, block_size: B and T.
      rows: which rows of the global batch to build (a slice or indices: a process builds only its own).
    Returns:
      (x_BT, y_BT) int32, y shifted one token to the left of x.
    """
    check_block_size(tokens, block_size)
    rng = np.random.default_rng((seed, stream, step))
    starts_B = rng.integers(0, len(tokens) - block_size, size=batch_size)[rows]
    window_BT1 = np.asarray(tokens[starts_B[:, None] + np.arange(block_size + 1)], dtype=np.int32)  # (B, T+1)
    return window_BT1[:, :-1], window_BT1[:, 1:]


def prefetch(make: Callable[[int], object], steps: range, depth: int) -> Iterator[object]:
    """Yield make(step) for each step, computed `depth` steps ahead on a host thread (depth 0: inline)."""
    if depth <= 0:
        yield from (make(s) for s in steps)
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work():
        for s in steps:
            try:
                item = (make(s), None)
            except BaseException as e:  # hand the error to the consumer
                item = (None, e)
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if stop.is_set() or item[1] is not None:
                return

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        for _ in steps:
            value, error = q.get()
            if error is not None:
                raise error
            yield value
    finally:
        stop.set()
