"""Shared command-line plumbing: user errors become one line on stderr and exit status 2."""

import sys
from collections.abc import Callable

from gpt_jax.errors import GPTJaxError, TrainingDiverged

EXIT_USAGE, EXIT_DIVERGED = 2, 3


def run_main(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """Call main(argv); GPTJaxError -> 'error: ...' and exit 2 (3 for a diverged run), no traceback
    unless --debug is among the arguments."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        return main([a for a in argv if a != "--debug"]) or 0
    except TrainingDiverged as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except GPTJaxError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
