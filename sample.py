"""Print what a trained model writes.

    python sample.py                                   # from the default out_dir of python train.py
    python sample.py --start="ROMEO:" --num_samples=3 --max_new_tokens=300 --temperature=0.8 --top_k=40
    python sample.py --start=FILE:prompt.txt --top_p=0.9 --seed=7
"""

import argparse
import sys
from pathlib import Path

from gpt_jax.cli import run_main
from gpt_jax.errors import ConfigError, DataError

SEPARATOR = "---------------"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2 via run_main, not argparse's usage dump
        raise ConfigError(f"{message}; see python sample.py --help")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = _Parser(description="Sample text from a gpt_jax checkpoint.", allow_abbrev=False)
    p.add_argument("--out_dir", default="out-shakespeare-char", help="training run folder (default: train.py's)")
    p.add_argument("--checkpoint", choices=("best", "latest"), default="best", help="which checkpoint to load")
    p.add_argument("--start", default="\n", help="prompt text, or FILE:path to read it from a file")
    p.add_argument("--num_samples", type=int, default=3, help="samples to draw")
    p.add_argument("--max_new_tokens", type=int, default=500, help="characters per sample")
    p.add_argument("--temperature", type=float, default=0.8, help="> 0; lower is more conservative")
    p.add_argument("--top_k", type=int, default=200, help="keep the k most likely tokens (1: greedy)")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling: keep tokens up to this mass, in (0, 1]")
    p.add_argument("--seed", type=int, default=1337, help="random seed (same seed, same text)")
    return p.parse_args(argv)


def read_prompt(start: str) -> str:
    if not start.startswith("FILE:"):
        return start
    path = Path(start[len("FILE:"):])
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"prompt file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"prompt file {path} is not valid UTF-8 (byte offset {e.start})") from None


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    prompt = read_prompt(args.start)
    if not prompt:
        raise DataError("the prompt is empty; pass --start with at least one character")
    if args.num_samples < 1 or args.max_new_tokens < 1:
        raise ConfigError("num_samples and max_new_tokens must be >= 1")

    import jax

    from gpt_jax.generate import check_sampling, generate, load_model

    check_sampling(args.temperature, args.top_k, args.top_p)
    params, cfg, tokenizer = load_model(args.out_dir, args.checkpoint)
    prompt_1P = tokenizer.encode(prompt)[None, :]
    key = jax.random.key(args.seed)
    for i in range(args.num_samples):
        tokens = generate(params, cfg, prompt_1P, jax.random.fold_in(key, i), args.max_new_tokens,
                          temperature=args.temperature, top_k=min(args.top_k, cfg.vocab_size) if args.top_k else None,
                          top_p=args.top_p)
        print(tokenizer.decode(tokens[0]))
        print(SEPARATOR)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
