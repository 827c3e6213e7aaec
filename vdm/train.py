"""Training, evaluation and sampling: one flat trainer that reads top to bottom.

``train_and_evaluate(config, workdir)`` is the whole program behind
``python -m vdm.main --mode train`` and the entry point from Python (a notebook: config in,
metrics out); ``evaluate_checkpoint`` and ``sample_checkpoint`` are the ``eval`` and
``sample`` modes. Everything random is a function of (config.seed, step), and the data order
is a function of (seed, step), so a run resumed from a checkpoint continues exactly as the
uninterrupted run would have.

The objective belongs to the model (``vdm.model.loss_and_grads``): this file only
applies the gradients, keeps the EMA and the state, and moves batches and metrics.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
import signal
import sys
import time
from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from vdm import checkpoint as ckpt_lib
from vdm import configlib, data as data_lib, inception, lock as lock_lib, metrics as metrics_lib, parallel, paths
from vdm import diffusion as diffusion_lib
from vdm import model as model_lib
from vdm import samplers as samplers_lib
from vdm import weight_decay

# --------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------


# The values of a step checked for NaN/inf, in the order of the bits of Health.*_terms.
CHECKED = ("prior", "reconstruction", "diffusion", "loss", "gamma_0", "gamma_1", "gradient norm")


class NonFiniteError(RuntimeError):
    """Training produced a NaN or infinity; the message (one line) names the step and the values."""


@struct.dataclass
class Health:
    """Non-finite steps, tracked on the device so that nothing syncs per step (int32 scalars).

    A step whose checked values (``CHECKED``) are not all finite is never applied: params,
    optimizer state, EMA and density stay as they were. ``first_*``: the first such step of
    the run (-1: none) and which values; ``run_*``: the current streak of them.
    """

    first_step: jax.Array
    first_terms: jax.Array
    run_start: jax.Array
    run_terms: jax.Array
    run_length: jax.Array
    skipped: jax.Array

    @classmethod
    def initial(cls) -> "Health":
        def none():
            return jnp.full((), -1, jnp.int32)

        def zero():  # a buffer of its own for each field: the train step donates the state
            return jnp.zeros((), jnp.int32)

        return cls(first_step=none(), first_terms=zero(), run_start=none(), run_terms=zero(), run_length=zero(),
                   skipped=zero())

    def after(self, step: jax.Array, bad_terms: jax.Array) -> "Health":
        """The record after step ``step`` (1-based) whose non-finite values are the bits ``bad_terms``."""
        bad = bad_terms != 0
        new_run = bad & (self.run_length == 0)
        return Health(
            first_step=jnp.where(bad & (self.first_step < 0), step, self.first_step),
            first_terms=jnp.where(bad & (self.first_step < 0), bad_terms, self.first_terms),
            run_start=jnp.where(new_run, step, jnp.where(bad, self.run_start, -1)),
            run_terms=jnp.where(bad, jnp.where(new_run, 0, self.run_terms) | bad_terms, 0),
            run_length=jnp.where(bad, self.run_length + 1, 0),
            skipped=self.skipped + bad.astype(jnp.int32))


def describe_terms(bits: int) -> str:
    return ", ".join(name for i, name in enumerate(CHECKED) if bits >> i & 1)


def check_health(health: Health, skip_nonfinite: int, last_checkpoint: int | None) -> None:
    """Raise NonFiniteError when the run must stop (one host sync of six scalars).

    ``skip_nonfinite`` 0: at the first non-finite step; N > 0: after N of them in a row.
    """
    h = {k: int(v) for k, v in jax.device_get(dataclasses.asdict(health)).items()}
    if skip_nonfinite == 0 and h["first_step"] >= 0:
        where, terms, what = h["first_step"], h["first_terms"], "step"
    elif skip_nonfinite > 0 and h["run_length"] >= skip_nonfinite:
        where, terms, what = h["run_start"], h["run_terms"], f"{h['run_length']} steps in a row from step"
    else:
        return
    kept = f"the last checkpoint is step {last_checkpoint}" if last_checkpoint is not None else "no checkpoint was saved"
    hint = ("lower train.lr or set train.grad_clip, or skip such steps with train.skip_nonfinite=N" if not skip_nonfinite
            else "lower train.lr or set train.grad_clip")
    raise NonFiniteError(f"non-finite {describe_terms(terms)} at {what} {where}; nothing non-finite was saved "
                         f"({kept}): {hint}")


@struct.dataclass
class TrainState:
    """Everything that changes during training, in one pytree (and one checkpoint)."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    rng: jax.Array  # uint32[2] raw PRNG key; step keys are fold_in(rng, step)
    params: Any  # pure dict of the model's nnx.Param values
    opt_state: Any
    ema_params: Any
    density: Any  # log-SNR density for importance sampling, or None
    health: Health


def model_initializer(config, info: data_lib.DatasetInfo):
    """(graphdef, init, decay_mask): the static structure, ``init(seed) -> params`` (a pure dict),
    and which parameters get weight decay (``vdm.weight_decay.decay_mask``: the weight matrices).

    ``init`` runs the initialisers inside one ``jax.jit`` (one compilation instead of one
    per parameter shape, which is what makes eager NNX construction slow on CPU); the
    values are the same as eager construction.
    """
    def make(key):
        return model_lib.VDM.from_config(config, image_shape=info.shape, vocab_size=info.vocab_size,
                                         rngs=nnx.Rngs(key))

    abstract = nnx.eval_shape(lambda: make(jax.random.key(0)))
    graphdef, _, rest = nnx.split(abstract, nnx.Param, ...)
    if jax.tree_util.tree_leaves(rest):
        raise configlib.ConfigError(f"model holds non-parameter state {list(nnx.to_pure_dict(rest))}")
    decay_mask = weight_decay.decay_mask(abstract)
    # Run once per process: on the CPU, LLVM's level-1 optimisation compiles it twice as fast as the default
    # (3.2 s -> 1.6 s for configs/mnist.py) and gave bitwise the same parameters for every shipped config (jax 0.12).
    options = {"xla_backend_optimization_level": 1} if jax.default_backend() == "cpu" else None
    init = jax.jit(lambda key: nnx.to_pure_dict(nnx.state(make(key), nnx.Param)), compiler_options=options)
    return graphdef, lambda seed: init(jax.random.key(seed)), decay_mask


def build_model(config, info: data_lib.DatasetInfo, seed: int) -> tuple[nnx.GraphDef, dict, dict]:
    """(graphdef, params, decay_mask) for ``seed``: see ``model_initializer``."""
    graphdef, init, decay_mask = model_initializer(config, info)
    return graphdef, init(seed), decay_mask


def make_optimizer(config, decay_mask) -> optax.GradientTransformation:
    """AdamW with linear warm-up, weight decay on ``decay_mask`` only, optional global-norm clipping.

    The learning rate (``learning_rate(config)``) warms up linearly, lr * (step + 1) / warmup_steps,
    so that the very first step already moves; then stays at lr (``train.lr_schedule="constant"``)
    or follows a cosine from lr to 0 at ``train.num_steps`` (``"cosine"``).
    """
    opt = config.train
    lr = learning_rate(config)
    adamw = optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay, mask=decay_mask)
    # The same chain (and optimizer state) with or without clipping: a run may resume with either.
    clip = optax.clip_by_global_norm(opt.grad_clip) if opt.grad_clip > 0 else optax.identity()
    return optax.chain(clip, adamw)


def learning_rate(config) -> optax.Schedule:
    """The learning rate by optimizer step (see ``make_optimizer``)."""
    opt = config.train
    warmup = max(int(opt.warmup_steps), 1)
    after = (optax.constant_schedule(opt.lr) if opt.lr_schedule == "constant"
             else optax.cosine_decay_schedule(opt.lr, max(int(opt.num_steps) - warmup + 1, 1)))
    return optax.join_schedules([optax.linear_schedule(opt.lr / warmup, opt.lr, warmup - 1), after], [warmup - 1])


def initial_state(config, params, tx, objective: model_lib.Objective) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(config.seed), params=params,
                      opt_state=tx.init(params), ema_params=jax.tree_util.tree_map(jnp.copy, params),
                      density=objective.initial_density(), health=Health.initial())


# --------------------------------------------------------------------------------------
# The compiled steps
# --------------------------------------------------------------------------------------


def make_train_step(graphdef, tx, config):
    """state, batch of k steps {"image": [k, B, ...], ...} -> (state after k optimizer steps, metrics of the last)."""
    objective = model_lib.Objective.from_config(config)
    ema_decay = config.train.ema_decay

    def one_step(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        loss, grads, terms = model_lib.loss_and_grads(graphdef, state.params, batch, rng, objective, state.density)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
        ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
        sums = model_lib.bpd_sums(terms, math.prod(batch["image"].shape[1:]))
        count = sums.pop("count")
        grad_norm = optax.tree.norm(grads)
        checked = (sums["bpd_prior"], sums["bpd_reconstruction"], sums["bpd_diffusion"], loss, terms.gamma_0,
                   terms.gamma_1, grad_norm)
        bad_terms = sum(jnp.where(jnp.isfinite(v), 0, 1 << i) for i, v in enumerate(checked)).astype(jnp.int32)
        health = state.health.after(state.step + 1, bad_terms)
        logged = {k: v / count for k, v in sums.items()} | {
            "loss": loss, "gamma_0": terms.gamma_0, "gamma_1": terms.gamma_1, "grad_norm": grad_norm,
            "skipped_steps": health.skipped}
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema,
                            density=objective.update_density(state.density, terms))
        # A non-finite step is never applied: everything but the step count and the record stays.
        kept = jax.tree_util.tree_map(lambda old, upd: jnp.where(bad_terms != 0, old, upd), state, new)
        return kept.replace(step=state.step + 1, health=health), logged

    def train_step(state, batch):
        state, logged = jax.lax.scan(one_step, state, batch)
        return state, jax.tree_util.tree_map(lambda m: m[-1], logged)

    return train_step


def make_eval_step(graphdef, config):
    """Masked sums over one padded batch of the per-example bits/dim, by ``config.eval.method``.

    ``vlb``: every VLB term; ``ode``: the probability-flow ODE's dequantised bound
    (``bpd_ode``) and the solver's network evaluations (``ode_nfe``); ``both``: both, on the
    same images. ``values`` holds the bounds per example (with ``mask``), for standard errors.
    """
    method, settings = config.eval.method, config.eval.ode.to_dict()

    def eval_step(params, batch, mask, rng):
        model = nnx.merge(graphdef, params)
        sums, values = {"count": jnp.sum(mask.astype(jnp.float32))}, {"mask": mask}
        if method in ("vlb", "both"):
            terms = model_lib.evaluation_terms(model, batch, jax.random.fold_in(rng, 0), num_steps=config.eval.num_steps)
            sums |= model_lib.bpd_sums(terms, model.num_dims, mask)
            sums.pop("loss")
            values["bpd"] = diffusion_lib.bits_per_dim(terms.vlb, model.num_dims)
        if method in ("ode", "both"):
            nll, nfe = model_lib.ode_nll(model, batch, jax.random.fold_in(rng, 1), **settings)
            values["bpd_ode"] = diffusion_lib.bits_per_dim(nll, model.num_dims)
            sums |= {"bpd_ode": jnp.sum(jnp.where(mask, values["bpd_ode"], 0.0)), "ode_nfe": nfe.astype(jnp.float32)}
        return sums, values
    return eval_step


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Compiled:
    """Everything of a run that is compiled; kept between runs of one config in one process."""

    graphdef: Any
    init: Any  # seed -> params
    tx: optax.GradientTransformation
    train_step: Any
    eval_step: Any
    sampling: Sampling


_COMPILED: dict[str, Compiled] = {}

# Config fields that change no compiled function: runs that differ only in these share them.
_NOT_COMPILED = {"seed": (), "data": (), "train": ("num_steps", "log_every", "eval_every", "checkpoint_every",
                                                   "keep_checkpoints", "coordinator_timeout_s",
                                                   "compilation_cache_dir", "skip_nonfinite"),
                 "eval": ("inception_weights",)}


def _compile_key(config, info, mesh) -> str:
    """What the compiled functions depend on: the config less ``_NOT_COMPILED``, the data's shape, the mesh."""
    c = json.loads(config.to_json_best_effort(sort_keys=True))
    num_steps = c["train"]["num_steps"]
    for section, fields in _NOT_COMPILED.items():
        if not fields:
            c.pop(section, None)
        for key in fields:
            c[section].pop(key, None)
    if c["train"]["lr_schedule"] != "constant":
        c["train"]["num_steps"] = num_steps  # the decay's length is compiled in
    devices = [d.id for d in mesh.devices.flat]
    return json.dumps([c, dataclasses.astuple(info)[1:], devices], sort_keys=True, default=str)


def compile_run(config, info, mesh) -> Compiled:
    """The jitted functions of a run (cached per process: a notebook's second run of a config reuses them)."""
    key = _compile_key(config, info, mesh)
    if key in _COMPILED:
        return _COMPILED[key]
    graphdef, init, decay_mask = model_initializer(config, info)
    tx = make_optimizer(config, decay_mask)
    replicated = parallel.replicated(mesh)
    steps_batch = parallel.batch_sharded(mesh, batch_axis=1)  # [k, B, ...]
    batch = parallel.batch_sharded(mesh)  # [B, ...]
    train_step = jax.jit(make_train_step(graphdef, tx, config), in_shardings=(replicated, steps_batch),
                         out_shardings=(replicated, replicated), donate_argnums=0)
    eval_step = jax.jit(make_eval_step(graphdef, config), in_shardings=(replicated, batch, batch, replicated),
                        out_shardings=replicated)
    c = config.sample

    def generation(params, rng, labels):
        return model_lib.generation(nnx.merge(graphdef, params), rng, c.num_images, num_steps=c.num_steps,
                                    sampler=c.sampler, labels=labels, guidance=c.guidance,
                                    sampler_kwargs=c.sampler_kwargs.to_dict())

    _COMPILED[key] = Compiled(graphdef, init, tx, train_step, eval_step, Sampling(generation))
    return _COMPILED[key]


class Sampling:
    """config.sample's sampler compiled in three parts, so that its loop runs in chunks of steps
    (one compiled call each, any chunk length): progress is shown between chunks and a signal
    stops sampling at the end of the current chunk. The samples equal those of one call.

    ``generation(params, rng, labels)`` builds the ``vdm.samplers.Generation``; it is rebuilt
    inside each compiled part, which costs nothing at run time.
    """

    CHUNK_SECONDS = 0.5  # the aim for one chunk's wall time (single process)

    def __init__(self, generation: Callable):
        self._generation = generation

        def start(params, rng, labels):
            g = generation(params, rng, labels)
            return g.plan.init(g.z_1)

        def advance(params, rng, labels, carry, lo, hi):
            return samplers_lib.advance(generation(params, rng, labels).plan, carry, lo, hi)

        def finish(params, rng, labels, carry):
            g = generation(params, rng, labels)
            z_0, nfe = g.plan.result(carry)
            return g.decode(z_0), nfe

        self._start, self._advance, self._finish = jax.jit(start), jax.jit(advance), jax.jit(finish)

    def num_steps(self, params, rng, labels) -> int:
        """The length of the sampler's loop (a static number: found by tracing, nothing runs)."""
        lengths = []
        jax.eval_shape(lambda *args: lengths.append(self._generation(*args).plan.num_steps) or 0, params, rng, labels)
        return lengths[0]

    def __call__(self, params, rng, labels, progress: Callable[[int, int], None] | None = None):
        """(images, nfe); ``progress(done, total)`` is called after each chunk."""
        total = self.num_steps(params, rng, labels)
        carry = self._start(params, rng, labels)
        done, chunk = 0, 1
        fixed = jax.process_count() > 1  # every process must run the same chunks
        if fixed:
            chunk = max(1, -(-total // 20))
        while done < total:
            stop = min(total, done + chunk)
            began = time.perf_counter()
            carry = jax.block_until_ready(self._advance(params, rng, labels, carry, done, stop))
            took = time.perf_counter() - began
            if not fixed:  # the first chunk includes the compilation, so it stays at one step; then ~0.5 s
                chunk = int(min(4 * chunk, max(1, self.CHUNK_SECONDS * (stop - done) / max(took, 1e-6))))
            done = stop
            if progress is not None:
                progress(done, total)
        return self._finish(params, rng, labels, carry)


def use_compilation_cache(directory: str) -> str | None:
    """Keep XLA's compiled programs in ``directory`` across processes (JAX's persistent cache).

    ``"auto"``: ``$XDG_CACHE_HOME/vdm/jax`` (default ``~/.cache/vdm/jax``); ``""``: off.
    A second run of the same config then skips XLA compilation. Returns the directory used.
    """
    if not directory:
        return None
    if directory == "auto":
        directory = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vdm", "jax")
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


def prepare(config) -> tuple[Any, data_lib.Dataset]:
    """Everything a run checks before compiling: the config, the processes, the mesh, the data.

    Raises ConfigError / DataError / DistributedError with one line on bad input.
    """
    configlib.validate(config)
    parallel.maybe_initialize_distributed(timeout_s=config.train.coordinator_timeout_s)
    mesh = parallel.make_data_mesh()
    try:
        parallel.check_batch_divisible(config.train.batch_size, mesh)
    except ValueError as e:
        raise configlib.ConfigError(str(e)) from None
    dataset = data_lib.load_dataset(config.data.source, **dict(config.data.kwargs))
    configlib.validate_against_data(config, dataset.info)
    return mesh, dataset


def _acquire_everywhere(lock: lock_lib.WorkdirLock) -> None:
    """Process 0 takes the workdir lock; every process learns whether it got it."""
    try:
        lock.acquire(is_main=jax.process_index() == 0)
        busy = None
    except lock_lib.WorkdirBusy as e:
        busy = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        if int(multihost_utils.broadcast_one_to_all(np.int32(busy is not None))) and busy is None:
            busy = lock_lib.WorkdirBusy(f"{lock.workdir} is in use by another training run (see process 0)")
    if busy is not None:
        raise busy


def _data_identity(info: data_lib.DatasetInfo) -> dict:
    return {"name": info.name, "shape": list(info.shape), "vocab_size": info.vocab_size,
            "num_classes": info.num_classes}


# Model fields that change no parameter: a checkpoint may be resumed with other values.
_COMPATIBLE_MODEL_FIELDS = {"dtype", "remat", "convolution_gradient", "weight_gradient"}


def _model_differences(meta: dict, config: dict, data_identity: dict) -> list[str]:
    """``field: checkpoint A, config B`` for each model field and data property that differs."""
    saved = {k: v for k, v in configlib.flatten(meta["config"].get("model", {}), "model").items()
             if k.split(".")[1] not in _COMPATIBLE_MODEL_FIELDS}
    now = {k: v for k, v in configlib.flatten(config.get("model", {}), "model").items()
           if k.split(".")[1] not in _COMPATIBLE_MODEL_FIELDS}
    saved |= configlib.flatten(meta.get("data", {}), "data")
    now |= configlib.flatten(data_identity, "data")
    missing = object()
    return [f"{k}: checkpoint {saved.get(k, 'unset')!r}, config {now.get(k, 'unset')!r}"
            for k in sorted(set(saved) | set(now)) if saved.get(k, missing) != now.get(k, missing)]


class Trainer:
    """Holds the compiled functions, the mesh and the data for one workdir.

    ``exclusive``: hold the workdir's lock (a training run); ``must_exist``: the workdir must
    already have checkpoints (eval and sample: a mistyped workdir is an error, not a new one).
    Everything that can be wrong with the input (config, data, the lock, a checkpoint from
    another model) is found before anything is compiled.
    """

    def __init__(self, config, workdir: str, *, exclusive: bool = False, must_exist: bool = False):
        self.config, self.workdir = config, workdir
        self.mesh, self.dataset = prepare(config)
        info = self.dataset.info
        # FID's network: read and checked now, so that a bad file is found before anything is compiled.
        self.inception_weights = inception.load_weights(config.eval.inception_weights) if config.eval.inception_weights \
            else None
        checkpoints = paths.join(workdir, "checkpoints")
        if must_exist and not paths.path(checkpoints).is_dir():
            raise ckpt_lib.CheckpointError(f"no checkpoint in {checkpoints}: train first (is --workdir right?)")
        self.lock = lock_lib.WorkdirLock(workdir)
        if exclusive:
            _acquire_everywhere(self.lock)
        try:
            self.checkpointer = ckpt_lib.Checkpointer(checkpoints, max_to_keep=config.train.keep_checkpoints)
            self.check_compatible()
        except BaseException:
            self.lock.release()
            raise
        self.restore_notes: list[str] = []
        self.compilation_cache = use_compilation_cache(config.train.compilation_cache_dir)
        compiled = compile_run(config, info, self.mesh)
        self.graphdef, self.tx = compiled.graphdef, compiled.tx
        self.train_step, self.eval_step, self._sample = compiled.train_step, compiled.eval_step, compiled.sampling
        self.objective = model_lib.Objective.from_config(config)
        params = compiled.init(config.seed)
        self.state = parallel.replicate(initial_state(config, params, self.tx, self.objective), self.mesh)

    def close(self, quiet: bool = False) -> None:
        """Wait for pending saves, release Orbax and the workdir lock.

        ``quiet``: an error is already on its way out; a failing save (say, a full disk) is not
        reported a second time over it.
        """
        try:
            self.checkpointer.close()
        except ckpt_lib.CheckpointError:
            if not quiet:
                raise
        finally:
            self.lock.release()

    def startup_lines(self) -> list[str]:
        """What this run sees: software, processes, devices, mesh, batch, precision, size, workdir."""
        opt, devices = self.config.train, jax.devices()
        num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(self.state.params))
        info = self.dataset.info
        return [
            f"vdm: jax {jax.__version__}, backend {jax.default_backend()} ({devices[0].device_kind}); "
            f"process {jax.process_index()} of {jax.process_count()}; "
            f"devices {jax.local_device_count()} local, {jax.device_count()} global",
            f"mesh {dict(self.mesh.shape)}; batch {opt.batch_size} global = "
            f"{opt.batch_size // jax.process_count()} per process = {opt.batch_size // self.mesh.size} per device; "
            f"{opt.steps_per_call} step(s) per call; compute {self.config.model.dtype}"
            f"{', remat' if self.config.model.remat else ''}",
            f"model: {num_params:,} parameters ({self.config.model.network}, {self.config.model.schedule} schedule); "
            f"data: {info.name} {info.shape} x {info.num_train} train / {info.num_test} test",
            f"workdir: {self.workdir}",
        ]

    # -- data ---------------------------------------------------------------------------

    def _to_devices(self, rows: list[dict]) -> dict:
        """This host's rows of k steps -> the global batch {"image": [k, B, ...], "label": [k, B]}, sharded."""
        return parallel.host_batch_to_global(self.mesh, {k: np.stack([r[k] for r in rows]) for k in rows[0]},
                                             batch_axis=1)

    def _hosts(self) -> dict:
        return {"process_index": jax.process_index(), "process_count": jax.process_count()}

    def train_batch(self, step: int) -> dict:
        """The global batch for steps step .. step + k - 1 (k = steps_per_call), by random access."""
        opt = self.config.train
        return self._to_devices([data_lib.train_batch(self.dataset.train, opt.batch_size, seed=self.config.seed,
                                                      step=step + i, **self._hosts())
                                 for i in range(opt.steps_per_call)])

    def train_batches(self, start_step: int):
        """The global batches from ``start_step`` on, k steps at a time, from the prefetching pipeline."""
        opt = self.config.train
        rows = data_lib.train_batches(self.dataset.train, opt.batch_size, seed=self.config.seed,
                                      start_step=start_step, **self._hosts())
        while True:
            yield self._to_devices([next(rows) for _ in range(opt.steps_per_call)])

    # -- checkpoints --------------------------------------------------------------------

    def meta(self) -> dict:
        """What a checkpoint records of the run besides the state: config, data, devices."""
        info = self.dataset.info
        return {"config": json.loads(self.config.to_json_best_effort()), "data": _data_identity(info),
                "devices": jax.device_count(), "processes": jax.process_count()}

    def check_compatible(self) -> None:
        """CheckpointError naming the fields that differ, if the newest checkpoint is of another model or data."""
        for step in reversed(self.checkpointer.all_steps()):
            meta = self.checkpointer.step_metadata(step)
            if "config" not in meta:
                continue  # unreadable: restoring it will say so (and fall back)
            differences = _model_differences(meta, json.loads(self.config.to_json_best_effort()),
                                             _data_identity(self.dataset.info))
            if differences:
                shown = "; ".join(differences[:4]) + (f" (+{len(differences) - 4} more)" if len(differences) > 4 else "")
                raise ckpt_lib.CheckpointError(
                    f"checkpoint step {step} in {self.checkpointer.directory} is of another model or data: {shown}; "
                    "use another --workdir, or the checkpoint's config")
            return

    def restore_latest(self) -> int:
        """Restore the newest intact checkpoint (damaged newer ones are moved aside, with a note in
        ``restore_notes``); returns the step (0 if there is none)."""
        step, state, notes = self.checkpointer.restore_newest_good(ckpt_lib.abstract_like(self.state))
        if step is not None:
            self.state = state
            devices = self.checkpointer.step_metadata(step).get("devices")
            if devices is not None and devices != jax.device_count():
                notes.append(f"checkpoint step {step} was written on {devices} device(s); continuing on "
                             f"{jax.device_count()} (the batches are a function of seed and step: the same data)")
        self.restore_notes = notes
        return int(self.state.step)

    def check_health(self) -> None:
        """Raise NonFiniteError if training went non-finite (see ``check_health``)."""
        check_health(self.state.health, self.config.train.skip_nonfinite, self.checkpointer.latest_step())

    def save(self) -> None:
        """Checkpoint the state, after checking that nothing in it came from a non-finite step."""
        self.check_health()
        step = int(self.state.step)
        if self.checkpointer.latest_step() != step:
            self.checkpointer.save(step, self.state, meta=self.meta())

    # -- evaluation and sampling ----------------------------------------------------------

    def evaluate(self, params=None, stop=None, show_progress: bool = False, per_example: bool = False) -> dict | None:
        """Bits/dim over one complete pass of the test split (EMA parameters), by ``config.eval.method``:
        the VLB (``bpd`` and its terms), the probability-flow ODE's bound (``bpd_ode``) or both,
        each with its standard error over the images (``*_se``).

        For a class-conditional model these are bounds on -log p(x | y).
        ``stop``: checked between batches; when it returns true, the pass ends and None is returned.
        ``show_progress``: a progress bar over the batches (``--mode eval``).
        ``per_example``: also return ``per_example`` = {"bpd": [N], ...}, each test image's bound (in test
        split order), for paired comparisons of models evaluated with the same randomness.
        """
        params = self.state.ema_params if params is None else params
        bs = self.config.eval.batch_size
        bs = -(-bs // self.mesh.size) * self.mesh.size  # round up to a multiple of the device count
        rng = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), 0x5EED)
        totals: dict[str, float] = {}
        num_examples = min(self.config.eval.num_examples or len(self.dataset.test), len(self.dataset.test))
        num_batches = -(-num_examples // bs)
        progress = None
        if show_progress:
            progress = metrics_lib.Progress(num_batches, log_every=max(1, num_batches // 10), unit="batch")
            progress.log(f"evaluating {num_examples} test images in {num_batches} batches of {bs}")
        batches = data_lib.eval_batches(self.dataset.test, bs, num_examples=self.config.eval.num_examples,
                                        **self._hosts())
        values_of: dict[str, list] = {}
        for i, host in enumerate(batches):
            if stop is not None and stop():
                return None
            if progress is not None:
                progress.update(i)
            batch = parallel.host_batch_to_global(self.mesh, host)
            mask = batch.pop("mask")
            sums, values = jax.device_get(self.eval_step(params, batch, mask, jax.random.fold_in(rng, i)))
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            keep = np.asarray(values.pop("mask"), bool)
            for k, v in values.items():
                values_of.setdefault(k, []).append(np.asarray(v, np.float64)[keep])
        if progress is not None:
            progress.update(num_batches)
            progress.close()
        count = totals.pop("count")
        nfe = totals.pop("ode_nfe", None)
        result = {k: v / count for k, v in totals.items()} | {"count": count}
        values = {name: np.concatenate(chunks) for name, chunks in values_of.items()}
        for name, v in values.items():  # standard error of the mean over the test images
            result[f"{name}_se"] = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
        if per_example:
            result["per_example"] = values
        if nfe is not None:
            result["ode_nfe"] = nfe / num_batches  # per batch: the solver's steps are shared by a batch
        return result

    def sample_labels(self) -> jax.Array | None:
        """The classes to sample: None for an unconditional model, else config.sample.labels (or an even spread)."""
        c, num_classes = self.config.sample, self.config.model.num_classes
        return model_lib.spread_labels(c.num_images, num_classes, c.labels) if num_classes else None

    def sample(self, step: int, writer: metrics_lib.MetricWriter | None = None, params=None,
               show_progress: bool = False) -> dict:
        """Draw config.sample.num_images samples with the EMA parameters.

        Writes ``samples_<step>.npz`` (``images`` uint8 [N, H, W, C], ``nfe`` and, for a
        conditional model, ``labels``) and ``samples_<step>.png``, and the grid to TensorBoard.
        Returns {"samples": the PNG's path, "nfe": network evaluations of the sampler}.
        The sampler's loop runs in chunks (``Sampling``): a signal stops it within about a second.
        """
        c = self.config.sample
        params = self.state.ema_params if params is None else params
        labels = self.sample_labels()
        rng = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), 0xA11)
        progress = None
        if show_progress:
            total = self._sample.num_steps(params, rng, labels)
            progress = metrics_lib.Progress(total, log_every=max(1, total // 10), unit="sampling step")
            progress.log(f"sampling {c.num_images} images: {c.sampler}, {total} steps")
        try:
            images, nfe = self._sample(params, rng, labels, None if progress is None else lambda done, _: progress.update(done))
        finally:
            if progress is not None:
                progress.close()
        images, nfe = np.asarray(images), int(nfe)
        info = self.dataset.info
        images = images.astype(np.uint8)
        path = paths.join(self.workdir, f"samples_{step}")
        if jax.process_index() == 0:
            arrays = {"images": images, "nfe": np.int64(nfe)} | ({} if labels is None else {"labels": np.asarray(labels)})
            buffer = io.BytesIO()
            np.savez(buffer, **arrays)
            paths.write_bytes(path + ".npz", buffer.getvalue())
            columns = self.config.model.num_classes if labels is not None and not c.labels else None
            grid = draw_samples(images, info.vocab_size, info.kind, columns=columns)
            save_png(path + ".png", grid)
            if writer is not None:
                writer.write_image(step, "samples", grid)
        quality = self.sample_quality(images, labels)
        if writer is not None and quality:
            writer.write(step, quality)
        return {"samples": path + ".png", "nfe": nfe} | quality

    def sample_quality(self, images: np.ndarray, labels) -> dict:
        """The sample-quality figures the config asks for: FD-MNIST (``config.sample.fd_mnist``) and
        FID (``config.eval.inception_weights``), each against the test split."""
        out = {}
        if self.config.sample.fd_mnist:
            out |= self.fd_mnist(images, labels)
        if self.inception_weights is not None:
            out |= self.fid(images)
        return out

    def fd_mnist(self, images: np.ndarray, labels) -> dict:
        """FD-MNIST of the samples against the test split, and how often the classifier sees the
        requested digit (conditional models). The feature network is cached in the workdir."""
        from vdm import quality

        net = quality.MnistFeatures.load_or_train(paths.join(self.workdir, "fd_mnist_classifier.npz"))
        reference = data_lib.read_rows(self.dataset.test, np.arange(len(self.dataset.test)))["image"]
        out = {"fd_mnist": net.fd(images, reference), "fd_mnist_images": len(images),
               "fd_mnist_classifier_accuracy": net.test_accuracy}
        if labels is not None:
            out["sample_accuracy"] = float(np.mean(net.predict(images) == np.asarray(labels)))
        return out

    def fid(self, images: np.ndarray) -> dict:
        """FID of the samples against the whole test split (``vdm.inception``), ``config.eval.batch_size``
        images at a time. The test split's statistics are computed once and cached in the workdir,
        named by the data set and the weights file's hash."""
        from vdm import quality

        net, info = self.inception_weights.network, self.dataset.info
        kw = {"batch_size": self.config.eval.batch_size, "max_value": info.vocab_size - 1}
        name = re.sub(r"\W+", "_", info.name)
        cache = paths.join(self.workdir, f"fid_reference_{name}_{self.inception_weights.sha256[:16]}.npz")

        def reference():
            title = f"FID: features of the {info.num_test} test images (once: cached as {cache})"
            mu, cov = quality.gaussian_statistics(inception.features(net, self.dataset.test, progress_title=title, **kw))
            return {"mu": mu, "cov": cov, "count": info.num_test}

        ref = quality.cached_arrays(cache, reference)
        fid = quality.frechet_distance_to(inception.features(net, images, **kw), ref["mu"], ref["cov"])
        return {"fid": fid, "fid_images": len(images), "fid_reference_images": int(ref["count"])}


def draw_samples(images: np.ndarray, vocab_size: int, kind: str, columns: int | None = None) -> np.ndarray:
    """A uint8 picture of integer samples [N, H, W, C] in {0..V-1}, as the data set's ``kind`` asks.

    ``"image"``: a grid with a 2-pixel border, values scaled to 0..255, ``columns`` wide
    (default: about square). ``"points"`` (2-D data, [N, 1, 1, 2]): a V x V scatter plot.
    """
    n, h, w, c = images.shape
    if kind == "points":
        canvas = np.full((vocab_size, vocab_size), 255, np.uint8)
        xy = images.reshape(n, 2).astype(np.int64)
        canvas[vocab_size - 1 - xy[:, 1], xy[:, 0]] = 0
        return canvas
    cols = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.zeros((rows * (h + 2) + 2, cols * (w + 2) + 2, c), np.uint8)
    scaled = np.round(images.astype(np.float64) * 255.0 / (vocab_size - 1)).astype(np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + k * (w + 2): 2 + k * (w + 2) + w] = scaled[i]
    return grid[..., 0] if c == 1 else grid


def save_png(path: str, picture: np.ndarray) -> None:
    """Write a uint8 picture as a PNG file (a local path or a URL)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    paths.write_bytes(path, buffer.getvalue())


class Interrupted(BaseException):
    """SIGINT or SIGTERM where there is nothing to save (evaluation, sampling), or a second SIGINT.

    A ``BaseException``, like ``KeyboardInterrupt``: library code that catches ``Exception`` (JAX's
    persistent compilation cache write, for one) must not swallow it and carry on."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.exit_code = 128 + signal.Signals[signal_name].value


class Signals:
    """SIGINT and SIGTERM. While ``deferring`` (the training steps), the first one only sets
    ``requested``: the loop finishes the current step, saves and stops. Otherwise, and at a
    second signal, ``Interrupted`` is raised at once."""

    def __init__(self):
        self.requested: str | None = None
        self.deferring = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: signals stay as they were
                pass
        return self

    def _handler(self, signum, frame):
        name = signal.Signals(signum).name
        if self.deferring and self.requested is None:
            self.requested = name
            return
        raise Interrupted(name)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def write_config(config, workdir: str) -> None:
    """``workdir/config.json``: the resolved config (process 0 only)."""
    if jax.process_index() == 0:
        paths.write_bytes(paths.join(workdir, "config.json"), config.to_json_best_effort(indent=2, sort_keys=True).encode())


def resolve_config(config, overrides: Mapping[str, Any] | None = None):
    """The ConfigDict of ``config``: a ConfigDict, or a shipped config's name (``"mnist"``) or a config
    file (``vdm.configs.get``), with ``overrides`` (``{"train.num_steps": 500}``) set on a copy as
    ``--config.train.num_steps=500`` would set them (``configlib.override``; its notes are printed)."""
    if isinstance(config, str):
        from vdm import configs

        config = configs.get(config)
    config, notes = configlib.override(config, overrides or {})
    for note in notes:
        print(note, file=sys.stderr)
    return config


def train_and_evaluate(config, workdir: str, overrides: Mapping[str, Any] | None = None) -> dict:
    """Train (resuming from the newest intact checkpoint in workdir), evaluate, sample; the final metrics.

    ``config``: a ConfigDict or the name of a shipped config or file, ``overrides`` set on a copy
    (``resolve_config``). Returns the test bits/dim (``bpd``, ``bpd_se`` and the VLB's terms, or
    ``bpd_ode``, by ``config.eval.method``), ``count`` (test images), ``samples`` (the PNG of the
    samples; the ``.npz`` beside it holds them), ``nfe``, ``step``, and ``fd_mnist`` where the config
    asks for it; ``{"step", "stopped": True}`` when SIGINT / SIGTERM stopped the run (saved).
    """
    config = resolve_config(config, overrides)
    trainer = Trainer(config, workdir, exclusive=True)  # config, data, lock, checkpoint's model: before compiling
    try:
        start = trainer.restore_latest()
        write_config(config, workdir)  # only once the run is accepted
        writer = metrics_lib.MetricWriter(workdir)
        progress = metrics_lib.Progress(config.train.num_steps, initial_step=start, log_every=config.train.log_every)
        try:
            for line in trainer.startup_lines() + trainer.restore_notes:
                progress.log(line)
            if start:
                progress.log(f"resumed from step {start} in {workdir}")
            with Signals() as signals:
                return _train_loop(trainer, writer, progress, start, signals)
        finally:
            progress.close()
            writer.close()
    finally:
        trainer.close(quiet=sys.exc_info()[0] is not None)


def _train_loop(trainer: Trainer, writer, progress, start: int, signals: Signals) -> dict:
    opt = trainer.config.train
    last_time, last_step = time.perf_counter(), start
    batches = trainer.train_batches(start)
    signals.deferring = True  # SIGINT / SIGTERM: finish the step, save, stop
    step = start
    while step < opt.num_steps:
        trainer.state, logged = trainer.train_step(trainer.state, next(batches))
        step += opt.steps_per_call
        if step % opt.log_every == 0 or step >= opt.num_steps:
            trainer.check_health()
            logged = {k: float(v) for k, v in jax.device_get(logged).items()}
            now = time.perf_counter()
            rate = (step - last_step) / max(now - last_time, 1e-9)
            last_time, last_step = now, step
            logged.update(steps_per_sec=rate, images_per_sec=rate * opt.batch_size)
            writer.write(step, logged)
            progress.update(step, loss=logged["loss"], bpd=logged["bpd"])
        if step % opt.eval_every == 0 and step < opt.num_steps:
            result = trainer.evaluate(stop=lambda: signals.requested)
            if result is not None:  # None: a signal came during the evaluation
                writer.write(step, {f"eval_{k}": v for k, v in result.items()})
                progress.log(f"step {step}: test bpd {result.get('bpd', result.get('bpd_ode')):.4f}")
        if step % opt.checkpoint_every == 0 or step >= opt.num_steps or signals.requested:
            trainer.save()
        if signals.requested:
            progress.log(f"{signals.requested}: saved step {step}, exiting")
            break
    trainer.checkpointer.wait()
    signals.deferring = False  # from here on a signal stops at once: the final state is saved
    if signals.requested:
        return {"step": step, "stopped": True}
    result = trainer.evaluate()
    step = int(trainer.state.step)
    writer.write(step, {f"eval_{k}": v for k, v in result.items()})
    progress.close()  # end the training bar's line before the sampler's
    return result | trainer.sample(step, writer, show_progress=True) | {"step": step}


def _restored_trainer(config, workdir: str) -> Trainer:
    trainer = Trainer(config, workdir, must_exist=True)
    try:
        if trainer.restore_latest() == 0 and trainer.checkpointer.latest_step() is None:
            raise ckpt_lib.CheckpointError(f"no checkpoint in {trainer.checkpointer.directory}: train first")
    except BaseException:
        trainer.close()
        raise
    for note in trainer.restore_notes:
        print(f"note: {note}", file=sys.stderr)
    return trainer


def evaluate_checkpoint(config, workdir: str, overrides: Mapping[str, Any] | None = None) -> dict:
    """--mode eval: test bits/dim of the latest checkpoint (EMA parameters); config as in ``train_and_evaluate``."""
    trainer = _restored_trainer(resolve_config(config, overrides), workdir)
    try:
        with Signals():
            return trainer.evaluate(show_progress=True) | {"step": int(trainer.state.step)}
    finally:
        trainer.close()


def sample_checkpoint(config, workdir: str, overrides: Mapping[str, Any] | None = None) -> dict:
    """--mode sample: samples (.npz, .png, TensorBoard) from the latest checkpoint; config as in ``train_and_evaluate``."""
    trainer = _restored_trainer(resolve_config(config, overrides), workdir)
    step = int(trainer.state.step)
    try:
        with Signals(), metrics_lib.MetricWriter(workdir) as writer:
            return trainer.sample(step, writer, show_progress=True) | {"step": step}
    finally:
        trainer.close()
