"""Data parallelism over a ('data',) device mesh, in one process or across several.

Four modes run the same single-device step (gpt_jax.train_step) and train identically:
  sharding   jit with in/out shardings: params and optimizer state replicated (P()), the batch split on its
             batch axis (P(None, 'data')); XLA inserts the gradient all-reduce.
  shard_map  a per-device program: local gradients, then an explicit `lax.pmean` over 'data'. It runs with
             check_vma=False: with the varying-axis checks on, the gradient of a replicated parameter
             comes back already summed over devices and a pmean on top would leave it N times too large.
  pmap       the legacy API, one process only, where this JAX still has it.
  fsdp       as sharding, but each parameter and its optimizer state are split over 'data' on their largest
             divisible axis; XLA gathers them for use.
With dropout, shard_map and pmap draw each device's mask from a key folded with the device index, so their
masks (not their statistics) differ from the single-device run; without dropout all four agree to float
tolerance.
"""

import dataclasses
import os
import sys
import threading
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gpt_jax.cli import EXIT_USAGE
from gpt_jax.config import Config
from gpt_jax.errors import ConfigError, GPTJaxError, first_line
from gpt_jax.train_step import TrainState, create_train_state, make_train_step

MODES = ("sharding", "shard_map", "pmap", "fsdp")
AXIS = "data"
CLUSTER_ENV = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "KUBERNETES_SERVICE_HOST")


class DistributedError(GPTJaxError):
    """The processes of a multi-process run could not start or lost a peer."""


def init_distributed(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
                     timeout_s: int = 300, heartbeat_s: int = 30) -> None:
    """Start jax.distributed from explicit flags, or from the environment of a cluster JAX detects.

    A peer that never starts is an error after `timeout_s`; a peer that dies ends the others within about
    `heartbeat_s`. Without flags or a cluster environment this does nothing (one process).
    """
    explicit = coordinator is not None or num_processes is not None or process_id is not None
    if not explicit and not any(k in os.environ for k in CLUSTER_ENV):
        return
    if explicit and (coordinator is None or num_processes is None or process_id is None):
        raise ConfigError("a multi-process run needs all of --coordinator=HOST:PORT --num_processes=N --process_id=I")
    message = (f"jax.distributed did not start within {timeout_s} s: not all {num_processes or 'N'} processes joined "
               f"{coordinator or 'the cluster'}; start every process with the same --coordinator and --num_processes, "
               f"or raise --init_timeout")
    # A peer that never registers makes the runtime abort the process from C++ (no Python exception), so
    # a watchdog gives the one-line error first; the runtime's own deadline is set a little later.
    watchdog = threading.Timer(timeout_s, _exit_with, args=(message,))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id, initialization_timeout=timeout_s + 30,
                                   heartbeat_timeout_seconds=heartbeat_s)
    except Exception as e:  # the runtime raises several types; the message is what the user needs
        raise DistributedError(f"{message} ({first_line(e)})") from None
    finally:
        watchdog.cancel()


def _exit_with(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(EXIT_USAGE)


def check_divisible(global_batch: int, n_devices: int) -> None:
    """ConfigError naming batch sizes that fit when the global batch does not split evenly."""
    if global_batch % n_devices:
        lower = global_batch // n_devices * n_devices
        fits = " or ".join(f"--batch_size={b}" for b in (lower, lower + n_devices) if b > 0)
        raise ConfigError(f"batch_size {global_batch} does not divide over {n_devices} devices; use {fits}")


def fsdp_spec(shape: tuple[int, ...], n: int) -> P:
    """Shard the largest axis that `n` divides; replicate what nothing divides."""
    axes = [i for i in sorted(range(len(shape)), key=lambda i: -shape[i]) if shape[i] % n == 0]
    if not axes or n == 1:
        return P()
    spec = [None] * len(shape)
    spec[axes[0]] = AXIS
    return P(*spec)


@dataclasses.dataclass
class DataParallel:
    """The mesh, the shardings and the compiled step of one parallel mode."""

    cfg: Config
    mode: str
    mesh: Mesh
    state_sharding: object  # pytree of NamedSharding matching TrainState
    step: Callable  # step(state, x, y) -> (state, metrics)

    @property
    def n_devices(self) -> int:
        return self.mesh.size

    def local_rows(self) -> slice:
        """Rows of each global micro-batch that this process builds (its devices' share)."""
        per_process = self.cfg.train.batch_size // jax.process_count()
        start = jax.process_index() * per_process
        return slice(start, start + per_process)

    def init_state(self) -> TrainState:
        """A fresh state, created directly with its shardings (no host-side copy of the whole state)."""
        if self.mode == "pmap":
            return self.place_state(create_train_state(self.cfg))
        return jax.jit(lambda: create_train_state(self.cfg), out_shardings=self.state_sharding)()

    def restore_target(self) -> TrainState:
        """Shapes, dtypes and shardings that orbax restores into."""
        abstract = jax.eval_shape(lambda: create_train_state(self.cfg))
        sharding = self.state_sharding if self.mode != "pmap" else jax.tree.map(
            lambda _: NamedSharding(self.mesh, P()), abstract)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, sharding)

    def place_state(self, state: TrainState) -> TrainState:
        """A restored or fresh state as the step takes it (pmap: one copy per device on a leading axis)."""
        if self.mode == "pmap":
            n = jax.local_device_count()
            return jax.tree.map(lambda x: jnp.broadcast_to(jnp.asarray(x), (n, *x.shape)), state)
        return jax.device_put(state, self.state_sharding)

    def checkpointable(self, state: TrainState) -> TrainState:
        """The state as one logical copy (what checkpoints hold and evaluation reads)."""
        return jax.tree.map(lambda x: x[0], state) if self.mode == "pmap" else state

    def place_batch(self, x_ABT: np.ndarray, y_ABT: np.ndarray):
        """This process's rows of the global batch -> the step's inputs."""
        A, B, T = x_ABT.shape
        if self.mode == "pmap":
            n = jax.local_device_count()
            split = lambda a: a.reshape(A, n, B // n, T).transpose(1, 0, 2, 3)  # (n, A, B/n, T)  # noqa: E731
            return split(x_ABT), split(y_ABT)
        sharding = NamedSharding(self.mesh, P(None, AXIS))
        shape = (A, B * jax.process_count(), T)
        return tuple(jax.make_array_from_process_local_data(sharding, a, shape) for a in (x_ABT, y_ABT))


def make_data_parallel(cfg: Config, mode: str | None = None, *, all_reduce: bool = True) -> DataParallel:
    """Build the mesh over every device of every process and compile-ready step for `mode`.

    all_reduce=False (shard_map only) drops the gradient pmean: for timing compute alone in the benchmark.
    """
    mode = mode or cfg.train.parallel
    if mode not in MODES:
        raise ConfigError(f"parallel must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "pmap" and not hasattr(jax, "pmap"):
        raise ConfigError("this JAX has no pmap; use --parallel=shard_map (the same explicit all-reduce)")
    if mode == "pmap" and jax.process_count() > 1:
        raise ConfigError("--parallel=pmap runs in one process; use sharding or shard_map across processes")
    mesh = Mesh(np.array(jax.devices()), (AXIS,))
    check_divisible(cfg.train.batch_size, mesh.size)
    abstract = jax.eval_shape(lambda: create_train_state(cfg))
    replicated = NamedSharding(mesh, P())
    if mode == "fsdp":
        state_sharding = jax.tree.map(lambda a: NamedSharding(mesh, fsdp_spec(a.shape, mesh.size)), abstract)
    else:
        state_sharding = jax.tree.map(lambda _: replicated, abstract)
    batch = NamedSharding(mesh, P(None, AXIS))

    if mode in ("sharding", "fsdp"):
        step = jax.jit(make_train_step(cfg), donate_argnums=0,
                       in_shardings=(state_sharding, batch, batch),  # state: replicated or split; batch: split
                       out_shardings=(state_sharding, replicated))  # metrics: replicated scalars
    elif mode == "shard_map":
        per_device = jax.shard_map(make_train_step(cfg, axis_name=AXIS, all_reduce=all_reduce), mesh=mesh,
                                   in_specs=(P(), P(None, AXIS), P(None, AXIS)), out_specs=(P(), P()),
                                   check_vma=False)
        step = jax.jit(per_device, donate_argnums=0)
    else:
        step = jax.pmap(make_train_step(cfg, axis_name=AXIS), axis_name=AXIS, donate_argnums=0)
    return DataParallel(cfg, mode, mesh, state_sharding, step)
