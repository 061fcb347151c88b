"""Start N local processes of a script as one jax.distributed run on 127.0.0.1.

    python -m gpt_jax.launch -n 2 [--devices_per_process 2] -- train.py configs/x.toml --max_iters=100

Each process gets --coordinator=127.0.0.1:<free port> --num_processes=N --process_id=I (and, where there is no
accelerator, K simulated CPU devices). Output lines are prefixed with [I]. If one process fails, the others
are stopped and the launcher exits with that process's status.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from gpt_jax.cli import run_main
from gpt_jax.errors import ConfigError

GRACE_S = 5  # after a failure, how long the others get after SIGTERM before SIGKILL


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(f"{message}; usage: python -m gpt_jax.launch -n N [--devices_per_process K] -- SCRIPT ARGS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _forward(index: int, stream) -> None:
    for line in stream:
        sys.stdout.write(f"[{index}] {line}")
        sys.stdout.flush()


def launch(n: int, command: list[str], devices_per_process: int = 1) -> int:
    """Run `python command...` n times as one distributed job; returns the job's exit status."""
    port = free_port()
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices_per_process}").strip()
    procs = []
    for i in range(n):
        args = [sys.executable, *command, f"--coordinator=127.0.0.1:{port}", f"--num_processes={n}", f"--process_id={i}"]
        p = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        threading.Thread(target=_forward, args=(i, p.stdout), daemon=True).start()
        procs.append(p)
    status = 0
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed:
                status = failed[0].returncode
                break
            time.sleep(0.2)
        else:
            status = next((p.returncode for p in procs if p.returncode), 0)
    except KeyboardInterrupt:
        status = 130
    finally:
        _stop(procs)
    if status:
        print(f"launch: a process exited with status {status}; stopped the others", file=sys.stderr)
    return status if status > 0 else 1 if status else 0


def _stop(procs: list[subprocess.Popen]) -> None:
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        p.send_signal(signal.SIGTERM)
    deadline = time.time() + GRACE_S
    for p in alive:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main(argv: list[str]) -> int:
    if "--" not in argv:
        raise ConfigError("put the script after --: python -m gpt_jax.launch -n 2 -- train.py ...")
    split = argv.index("--")
    parser = _Parser(prog="python -m gpt_jax.launch", allow_abbrev=False)
    parser.add_argument("-n", "--num_processes", type=int, required=True, help="processes to start")
    parser.add_argument("--devices_per_process", type=int, default=1, help="simulated CPU devices per process")
    args = parser.parse_args(argv[:split])
    if args.num_processes < 1 or args.devices_per_process < 1 or not argv[split + 1:]:
        raise ConfigError("need -n >= 1, --devices_per_process >= 1 and a script after --")
    return launch(args.num_processes, argv[split + 1:], args.devices_per_process)


if __name__ == "__main__":
    sys.exit(run_main(main))
