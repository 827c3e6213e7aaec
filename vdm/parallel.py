"""Data parallelism with ``jax.jit`` and ``NamedSharding`` over a 1-D mesh.

The trainer keeps parameters and optimizer state *replicated* on every device
and shards each global batch along its leading axis over a single mesh axis
called ``"data"``.  ``jax.jit`` then compiles one SPMD program; XLA inserts the
gradient all-reduce itself, so no ``pmap``/``psum`` bookkeeping is needed::

    maybe_initialize_distributed()            # before any other JAX call
    mesh = make_data_mesh()
    check_batch_divisible(cfg.batch_size, mesh)
    state = replicate(state, mesh)
    step = jax.jit(train_step,
                   in_shardings=(replicated(mesh), batch_sharded(mesh)),
                   out_shardings=(replicated(mesh), replicated(mesh)),
                   donate_argnums=0)
    batch = host_batch_to_global(mesh, this_hosts_rows)   # rows p*B/P .. (p+1)*B/P of process p
    state, metrics = step(state, batch)

Multi-process (multi-host) runs use the same code: every process calls the
functions above with the *global* batch size and feeds only its own rows.
On CPU, cross-process collectives use gloo, which is the default
``jax_cpu_collectives_implementation`` in current JAX (set
``JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo`` explicitly on older versions).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
"""Name of the single mesh axis the batch is sharded over."""

__all__ = [
    "DATA_AXIS",
    "batch_sharded",
    "check_batch_divisible",
    "host_batch_to_global",
    "make_data_mesh",
    "maybe_initialize_distributed",
    "replicate",
    "replicated",
]


class DistributedError(RuntimeError):
    """The processes of a multi-host run could not be connected; the message is one line."""


def maybe_initialize_distributed(enable: bool | None = None, *, timeout_s: int = 300, log=None,
                                 **kwargs: Any) -> bool:
    """Initialise ``jax.distributed`` if (and only if) this run is multi-process.

    Decision rule, evaluated without touching any JAX device (so it is safe to
    call first thing in a program):

    * already initialised -> nothing to do, returns ``True`` (idempotent);
    * ``enable=False`` -> never initialise, returns ``False``;
    * ``enable=True`` -> initialise; anything not given in ``kwargs`` is taken
      from the environment variables below or from JAX's cluster auto-detection
      (SLURM, Open MPI, Cloud TPU pods, Kubernetes);
    * ``enable=None`` (default) -> initialise iff a coordinator address is
      known: ``JAX_COORDINATOR_ADDRESS`` in the environment or a
      ``coordinator_address`` keyword argument.

    Environment variables: ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of
    process 0, read by JAX itself), ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID`` (read here, since ``jax.distributed.initialize`` does not).

    While it waits for the other processes it says so through ``log`` (default: a
    line on stderr). If they have not all arrived after ``timeout_s`` seconds, it
    prints one ``error:`` line saying what to check and ends the process with exit
    code 2 (JAX's coordination client would otherwise abort it with a C++ stack
    trace a little later). Other failures raise :class:`DistributedError`.

    Args:
      enable: force (``True``), forbid (``False``) or auto-detect (``None``).
      timeout_s: how long to wait for all processes to reach the coordinator.
      log: ``log(message)`` for the waiting line.
      **kwargs: passed to ``jax.distributed.initialize`` (``coordinator_address``,
        ``num_processes``, ``process_id``, ``local_device_ids``, ...).

    Returns:
      Whether ``jax.distributed`` is initialised after the call.
    """
    if jax.distributed.is_initialized():
        return True
    address = kwargs.get("coordinator_address") or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if enable is None:
        enable = bool(address)
    if not enable:
        return False
    for key, env in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
        if kwargs.get(key) is None and os.environ.get(env):
            try:
                kwargs[key] = int(os.environ[env])
            except ValueError:
                raise DistributedError(f"{env}={os.environ[env]!r} is not an integer") from None
    kwargs.setdefault("initialization_timeout", int(timeout_s) + 60)  # our watchdog below fires first
    who = (f"process {kwargs['process_id']} of {kwargs['num_processes']}"
           if kwargs.get("process_id") is not None and kwargs.get("num_processes") is not None
           else "this process (ids from JAX's cluster detection)")
    (log or (lambda m: print(m, file=sys.stderr, flush=True)))(
        f"waiting up to {timeout_s} s for all processes at the JAX coordinator {address or '(auto-detected)'} "
        f"as {who}")
    arrived = threading.Event()

    def give_up():
        if not arrived.is_set():
            print(f"error: not every process reached the JAX coordinator {address} within {timeout_s} s ({who}): "
                  "start the same command on every host, with JAX_NUM_PROCESSES and a distinct JAX_PROCESS_ID "
                  "each, and check that the address is reachable", file=sys.stderr, flush=True)
            os._exit(2)

    watchdog = threading.Timer(timeout_s, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001 - JAX raises ValueError, RuntimeError or XlaRuntimeError
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise DistributedError(
            f"jax.distributed.initialize failed: {first[:300]} (set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES "
            "and JAX_PROCESS_ID on every host, or run under a cluster JAX detects)") from None
    finally:
        arrived.set()
        watchdog.cancel()
    return True


def make_data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices`` (default: all global devices).

    Devices keep ``jax.devices()`` order, which groups each process's devices
    together, so every process owns one contiguous block of batch rows.  The
    axis is ``AxisType.Auto``: the compiler propagates shardings through model
    code that carries no sharding annotations (``jax.make_mesh`` defaults to
    ``Explicit`` axes, which make shardings part of array types instead).
    """
    devs = list(jax.devices() if devices is None else devices)
    if not devs:
        raise ValueError("make_data_mesh needs at least one device")
    return Mesh(np.asarray(devs, dtype=object), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy of an array on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
    """Sharding that splits an array's batch axis (default the leading one) over ``"data"``."""
    return NamedSharding(mesh, PartitionSpec(*(None,) * batch_axis, DATA_AXIS))


def check_batch_divisible(global_batch: int, mesh: Mesh, *, name: str = "train.batch_size") -> None:
    """Raise ``ValueError`` unless ``global_batch`` splits evenly over ``mesh``.

    Call it before compiling anything so a bad config fails with one line,
    e.g. ``train.batch_size=30 is not divisible by the 8 devices``.
    """
    n = mesh.size
    if global_batch <= 0 or global_batch % n:
        raise ValueError(f"{name}={global_batch} is not divisible by the {n} devices")


def host_batch_to_global(mesh: Mesh, host_batch: Any, batch_axis: int = 0) -> Any:
    """Assemble per-process numpy batches into global arrays sharded on ``"data"``.

    Args:
      mesh: the data mesh.
      host_batch: a pytree of arrays whose ``batch_axis`` is this process's
        contiguous block of the global batch (the whole batch when running
        single-process; process ``p`` of ``P`` holds rows ``p B/P .. (p+1) B/P``).
        Every process must pass blocks of the same size.
      batch_axis: which axis is the batch (1 for ``[steps, batch, ...]`` stacks).

    Returns:
      The same pytree of ``jax.Array`` with global batch size
      ``local_rows * process_count``, each device holding its block of rows.
    """
    sharding = batch_sharded(mesh, batch_axis)
    n_local = len(mesh.local_devices)
    n_processes = mesh.size // n_local

    def to_global(x: Any) -> jax.Array:
        x = np.asarray(x)
        if x.ndim <= batch_axis or x.shape[batch_axis] % n_local:
            raise ValueError(
                f"host batch leaf of shape {x.shape} cannot be split over this "
                f"process's {n_local} devices along axis {batch_axis}"
            )
        shape = x.shape[:batch_axis] + (x.shape[batch_axis] * n_processes,) + x.shape[batch_axis + 1:]
        return jax.make_array_from_process_local_data(sharding, x, shape)

    return jax.tree.map(to_global, host_batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every leaf of ``tree`` (params, optimizer state, keys...) replicated on ``mesh``.

    Leaves may be numpy arrays, Python scalars or ``jax.Array`` (including
    typed PRNG keys).  In a multi-process run each process must pass the same
    values (e.g. initialise from the same seed): this is not checked.
    """
    sharding = replicated(mesh)
    multi_process = jax.process_count() > 1

    def put(x: Any) -> jax.Array:
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if not multi_process or (isinstance(x, jax.Array) and not x.is_fully_addressable):
            return jax.device_put(x, sharding)
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = put(jax.random.key_data(x))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        # Host-local value: every process holds the full array, so its
        # "process-local data" for a replicated sharding is the array itself.
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree.map(put, tree)
