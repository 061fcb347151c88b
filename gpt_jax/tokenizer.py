"""Character tokenizer: the vocabulary is the sorted set of characters of the corpus.

Saved as JSON (data only, nothing that executes code on load) beside the token files and in every checkpoint.
"""

import json
from pathlib import Path

import numpy as np

from gpt_jax.errors import DataError
from gpt_jax.fileio import write_atomic


class CharTokenizer:
    """Maps characters to ids 0..V-1 in sorted order; `encode` and `decode` are inverses."""

    def __init__(self, chars: str):
        self.chars = "".join(sorted(set(chars)))
        self._index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        if not text:
            raise DataError("the corpus is empty; point --dataset at a non-empty UTF-8 text file")
        return cls(text)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """str -> (len(text),) uint16 ids. Raises DataError naming any characters outside the vocabulary."""
        try:
            return np.fromiter((self._index[c] for c in text), dtype=np.uint16, count=len(text))
        except KeyError:
            unknown = sorted(set(text) - set(self._index))
            shown = ", ".join(repr(c) for c in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
            raise DataError(
                f"{len(unknown)} character(s) not in the model's vocabulary: {shown}; remove them from the text"
            ) from None

    def decode(self, ids) -> str:
        """Sequence of ids -> str."""
        return "".join(self.chars[int(i)] for i in ids)

    def to_json(self) -> str:
        return json.dumps({"kind": "char", "chars": self.chars}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "CharTokenizer":
        try:
            data = json.loads(text)
            if data.get("kind") != "char" or not isinstance(data.get("chars"), str):
                raise ValueError
        except (ValueError, AttributeError):
            raise DataError("tokenizer JSON is not a char tokenizer ({'kind': 'char', 'chars': ...})") from None
        return cls(data["chars"])

    def save(self, path: str | Path) -> None:
        write_atomic(path, self.to_json().encode("utf-8"))

    @classmethod
    def load(cls, path: str | Path) -> "CharTokenizer":
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    def __eq__(self, other) -> bool:
        return isinstance(other, CharTokenizer) and other.chars == self.chars
