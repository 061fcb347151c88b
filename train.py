"""Train a character-level GPT on tiny Shakespeare.

    python train.py                              # picks the recipe for this machine (GPU or CPU)
    python train.py configs/shakespeare_char.toml --max_iters=2000 --out_dir=out-run2
    python train.py --out_dir=out --resume        # continue a stopped run
    python train.py --help                       # every key with its type, default and meaning
    python train.py --parallel=shard_map          # data parallel over all devices (sharding, shard_map, pmap, fsdp)
    python train.py --coordinator=HOST:PORT --num_processes=N --process_id=I   # one of N processes
    python -m gpt_jax.launch -n 2 -- train.py ...  # N local processes on 127.0.0.1
"""

import sys

from gpt_jax import config
from gpt_jax.cli import run_main
from gpt_jax.config import REPO_ROOT
from gpt_jax.hostmem import keep_freed_memory

USAGE = ("usage: python train.py [CONFIG.toml] [--key=value ...] [--resume] [--debug]\n"
         "       [--coordinator=HOST:PORT --num_processes=N --process_id=I] [--init_timeout=SECONDS]")
LAUNCH_FLAGS = {"coordinator": str, "num_processes": int, "process_id": int, "init_timeout": int}


def default_config_path() -> str:
    """The GPU recipe where JAX sees an accelerator, else the 2-core CPU recipe (said on one line)."""
    import jax

    if jax.default_backend() == "cpu":
        print("no GPU/TPU visible to JAX: using configs/shakespeare_char_cpu.toml, the small recipe that "
              "finishes in minutes on a CPU (pass configs/shakespeare_char.toml for nanoGPT's full recipe)")
        return str(REPO_ROOT / "configs" / "shakespeare_char_cpu.toml")
    return str(REPO_ROOT / "configs" / "shakespeare_char.toml")


def main(argv: list[str]) -> int:
    keep_freed_memory()  # before JAX starts: see gpt_jax/hostmem.py
    if "--help" in argv or "-h" in argv:
        print(USAGE + "\n\nkeys (--key=value; the same names in a config file):\n" + config.help_text())
        return 0
    resume = "--resume" in argv
    argv = [a for a in argv if a != "--resume"]
    path = argv.pop(0) if argv and not argv[0].startswith("--") else None
    overrides = config.parse_overrides(argv)
    launch = {k: overrides.pop(k) for k in list(overrides) if k in LAUNCH_FLAGS}
    try:
        launch = {k: LAUNCH_FLAGS[k](v) for k, v in launch.items()}
    except ValueError:
        raise config.ConfigError(f"bad launch flag in {launch}; e.g. --num_processes=2 --process_id=0") from None
    if path is not None:  # validate the config before starting any runtime
        cfg = config.load(path, overrides)

    from gpt_jax.parallel import init_distributed

    init_distributed(launch.get("coordinator"), launch.get("num_processes"), launch.get("process_id"),
                     timeout_s=launch.get("init_timeout", 300))
    if path is None:
        cfg = config.load(default_config_path(), overrides)

    from gpt_jax.trainer import train  # imports JAX: after the cheap argument checks

    train(cfg, resume=resume)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
