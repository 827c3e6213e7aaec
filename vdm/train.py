"""Training, evaluation and sampling: one flat trainer that reads top to bottom.

``train_and_evaluate(config, workdir)`` is the whole program behind
``python -m vdm.main --mode train``; ``evaluate_checkpoint`` and ``sample_checkpoint``
are the ``eval`` and ``sample`` modes. Everything random is a function of
(config.seed, step), and the data order is a function of (seed, step), so a run resumed
from a checkpoint continues exactly as the uninterrupted run would have.

The objective belongs to the model (``vdm.model.loss_and_grads``): this file only
applies the gradients, keeps the EMA and the state, and moves batches and metrics.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from vdm import checkpoint as ckpt_lib
from vdm import configlib, data as data_lib, metrics as metrics_lib, parallel, paths
from vdm import model as model_lib
from vdm.nets.layers import Kernel

# --------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------


@struct.dataclass
class TrainState:
    """Everything that changes during training, in one pytree (and one checkpoint)."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    rng: jax.Array  # uint32[2] raw PRNG key; step keys are fold_in(rng, step)
    params: Any  # pure dict of the model's nnx.Param values
    opt_state: Any
    ema_params: Any
    density: Any  # log-SNR density for importance sampling, or None


def model_initializer(config, info: data_lib.DatasetInfo):
    """(graphdef, init, decay_mask): the static structure, ``init(seed) -> params`` (a pure dict),
    and which parameters get weight decay (the networks' ``Kernel`` parameters, by type).

    ``init`` runs the initialisers inside one ``jax.jit`` (one compilation instead of one
    per parameter shape, which is what makes eager NNX construction slow on CPU); the
    values are the same as eager construction.
    """
    def make(key):
        return model_lib.VDM.from_config(config, image_shape=info.shape, vocab_size=info.vocab_size,
                                         rngs=nnx.Rngs(key))

    graphdef, abstract, rest = nnx.split(nnx.eval_shape(lambda: make(jax.random.key(0))), nnx.Param, ...)
    if jax.tree_util.tree_leaves(rest):
        raise configlib.ConfigError(f"model holds non-parameter state {list(nnx.to_pure_dict(rest))}")
    decay_mask = nnx.to_pure_dict(jax.tree.map(lambda v: isinstance(v, Kernel), abstract,
                                               is_leaf=lambda v: isinstance(v, nnx.Variable)))
    init = jax.jit(lambda key: nnx.to_pure_dict(nnx.state(make(key), nnx.Param)))
    return graphdef, lambda seed: init(jax.random.key(seed)), decay_mask


def build_model(config, info: data_lib.DatasetInfo, seed: int) -> tuple[nnx.GraphDef, dict, dict]:
    """(graphdef, params, decay_mask) for ``seed``: see ``model_initializer``."""
    graphdef, init, decay_mask = model_initializer(config, info)
    return graphdef, init(seed), decay_mask


def make_optimizer(config, decay_mask) -> optax.GradientTransformation:
    """AdamW with linear warm-up, weight decay on ``decay_mask`` only, optional global-norm clipping."""
    opt = config.train
    # Linear warm-up lr * (step + 1) / warmup_steps, so that the very first step already moves.
    warmup = max(int(opt.warmup_steps), 1)
    lr = optax.join_schedules([optax.linear_schedule(opt.lr / warmup, opt.lr, warmup - 1),
                               optax.constant_schedule(opt.lr)], [warmup - 1])
    adamw = optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(opt.grad_clip), adamw) if opt.grad_clip > 0 else adamw


def initial_state(config, params, tx, objective: model_lib.Objective) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(config.seed), params=params,
                      opt_state=tx.init(params), ema_params=jax.tree_util.tree_map(jnp.copy, params),
                      density=objective.initial_density())


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
        logged = {k: v / count for k, v in sums.items()} | {
            "loss": loss, "gamma_0": terms.gamma_0, "gamma_1": terms.gamma_1, "grad_norm": optax.tree.norm(grads)}
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema,
                            density=objective.update_density(state.density, terms))
        return new, logged

    def train_step(state, batch):
        state, logged = jax.lax.scan(one_step, state, batch)
        return state, jax.tree_util.tree_map(lambda m: m[-1], logged)

    return train_step


def make_eval_step(graphdef, config):
    """Masked sums over one padded batch of the per-example VLB terms (bits/dim)."""
    def eval_step(params, batch, mask, rng):
        model = nnx.merge(graphdef, params)
        terms = model_lib.evaluation_terms(model, batch, rng, num_steps=config.eval.num_steps)
        sums = model_lib.bpd_sums(terms, model.num_dims, mask)
        sums.pop("loss")
        return sums
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
    sample: Any  # (params, rng, labels) -> images


_COMPILED: dict[str, Compiled] = {}

# Config fields that change no compiled function: runs that differ only in these share them.
_NOT_COMPILED = {"seed": (), "data": (), "train": ("num_steps", "log_every", "eval_every", "checkpoint_every",
                                                   "keep_checkpoints", "coordinator_timeout_s",
                                                   "compilation_cache_dir")}


def _compile_key(config, info, mesh) -> str:
    """What the compiled functions depend on: the config less ``_NOT_COMPILED``, the data's shape, the mesh."""
    c = json.loads(config.to_json_best_effort(sort_keys=True))
    for section, fields in _NOT_COMPILED.items():
        if not fields:
            c.pop(section, None)
        for key in fields:
            c[section].pop(key, None)
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

    def sample(params, rng, labels):
        return model_lib.generate(nnx.merge(graphdef, params), rng, c.num_images, num_steps=c.num_steps,
                                  sampler=c.sampler, labels=labels, guidance=c.guidance)

    _COMPILED[key] = Compiled(graphdef, init, tx, train_step, eval_step, jax.jit(sample))
    return _COMPILED[key]


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


class Trainer:
    """Holds the compiled functions, the mesh and the data for one workdir."""

    def __init__(self, config, workdir: str):
        self.config, self.workdir = config, workdir
        self.mesh, self.dataset = prepare(config)
        info = self.dataset.info
        self.compilation_cache = use_compilation_cache(config.train.compilation_cache_dir)
        compiled = compile_run(config, info, self.mesh)
        self.graphdef, self.tx = compiled.graphdef, compiled.tx
        self.train_step, self.eval_step, self._sample = compiled.train_step, compiled.eval_step, compiled.sample
        self.objective = model_lib.Objective.from_config(config)
        params = compiled.init(config.seed)
        self.state = parallel.replicate(initial_state(config, params, self.tx, self.objective), self.mesh)
        self.checkpointer = ckpt_lib.Checkpointer(paths.join(workdir, "checkpoints"),
                                                  max_to_keep=config.train.keep_checkpoints)

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

    def restore_latest(self) -> int:
        step = self.checkpointer.latest_step()
        if step is not None:
            self.state = self.checkpointer.restore(step, target=ckpt_lib.abstract_like(self.state))
        return int(self.state.step)

    def save(self) -> None:
        step = int(self.state.step)
        if self.checkpointer.latest_step() != step:
            self.checkpointer.save(step, self.state)

    # -- evaluation and sampling ----------------------------------------------------------

    def evaluate(self, params=None) -> dict:
        """Bits/dim of the VLB over one complete pass of the test split (EMA parameters).

        For a class-conditional model this is the conditional bound on -log p(x | y).
        """
        params = self.state.ema_params if params is None else params
        bs = self.config.eval.batch_size
        bs = -(-bs // self.mesh.size) * self.mesh.size  # round up to a multiple of the device count
        rng = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), 0x5EED)
        totals: dict[str, float] = {}
        batches = data_lib.eval_batches(self.dataset.test, bs, num_examples=self.config.eval.num_examples,
                                        **self._hosts())
        for i, host in enumerate(batches):
            batch = parallel.host_batch_to_global(self.mesh, host)
            mask = batch.pop("mask")
            sums = self.eval_step(params, batch, mask, jax.random.fold_in(rng, i))
            for k, v in jax.device_get(sums).items():
                totals[k] = totals.get(k, 0.0) + float(v)
        count = totals.pop("count")
        return {k: v / count for k, v in totals.items()} | {"count": count}

    def sample_labels(self) -> jax.Array | None:
        """The classes to sample: None for an unconditional model, else config.sample.labels (or an even spread)."""
        c, num_classes = self.config.sample, self.config.model.num_classes
        return model_lib.spread_labels(c.num_images, num_classes, c.labels) if num_classes else None

    def sample(self, step: int, writer: metrics_lib.MetricWriter | None = None, params=None) -> str:
        """Draw config.sample.num_images samples with the EMA parameters.

        Writes ``samples_<step>.npz`` (``images`` uint8 [N, H, W, C] and, for a conditional
        model, ``labels``) and ``samples_<step>.png``, and the grid to TensorBoard.
        Returns the PNG's path.
        """
        c = self.config.sample
        params = self.state.ema_params if params is None else params
        labels = self.sample_labels()
        images = np.asarray(self._sample(params, jax.random.fold_in(jax.random.PRNGKey(self.config.seed), 0xA11),
                                         labels))
        info = self.dataset.info
        images = images.astype(np.uint8)
        path = paths.join(self.workdir, f"samples_{step}")
        if jax.process_index() == 0:
            arrays = {"images": images} | ({} if labels is None else {"labels": np.asarray(labels)})
            buffer = io.BytesIO()
            np.savez(buffer, **arrays)
            paths.write_bytes(path + ".npz", buffer.getvalue())
            columns = self.config.model.num_classes if labels is not None and not c.labels else None
            grid = draw_samples(images, info.vocab_size, info.kind, columns=columns)
            save_png(path + ".png", grid)
            if writer is not None:
                writer.write_image(step, "samples", grid)
        return path + ".png"


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


class _StopRequested:
    """Set by SIGTERM so the loop can save a checkpoint before exiting."""

    def __init__(self):
        self.flag = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM,):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def _handler(self, signum, frame):
        self.flag = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def write_config(config, workdir: str) -> None:
    """``workdir/config.json``: the resolved config (process 0 only)."""
    if jax.process_index() == 0:
        paths.write_bytes(paths.join(workdir, "config.json"), config.to_json_best_effort(indent=2, sort_keys=True).encode())


def train_and_evaluate(config, workdir: str) -> dict:
    """Train (resuming from the latest checkpoint in workdir), evaluate, sample. Returns final metrics."""
    trainer = Trainer(config, workdir)  # validates config, loads data: fails before any compile
    write_config(config, workdir)
    start = trainer.restore_latest()
    writer = metrics_lib.MetricWriter(workdir)
    progress = metrics_lib.Progress(config.train.num_steps, initial_step=start, log_every=config.train.log_every)
    try:
        for line in trainer.startup_lines():
            progress.log(line)
        if start:
            progress.log(f"resumed from step {start} in {workdir}")
        return _train_loop(trainer, writer, progress, start)
    finally:
        progress.close()
        writer.close()
        trainer.checkpointer.close()


def _train_loop(trainer: Trainer, writer, progress, start: int) -> dict:
    opt = trainer.config.train
    last_time, last_step = time.perf_counter(), start
    batches = trainer.train_batches(start)
    with _StopRequested() as stop:
        step = start
        while step < opt.num_steps:
            trainer.state, logged = trainer.train_step(trainer.state, next(batches))
            step += opt.steps_per_call
            if step % opt.log_every == 0 or step >= opt.num_steps:
                logged = {k: float(v) for k, v in jax.device_get(logged).items()}
                now = time.perf_counter()
                rate = (step - last_step) / max(now - last_time, 1e-9)
                last_time, last_step = now, step
                logged.update(steps_per_sec=rate, images_per_sec=rate * opt.batch_size)
                writer.write(step, logged)
                progress.update(step, loss=logged["loss"], bpd=logged["bpd"])
            if step % opt.eval_every == 0 and step < opt.num_steps:
                result = trainer.evaluate()
                writer.write(step, {f"eval_{k}": v for k, v in result.items()})
                progress.log(f"step {step}: test bpd {result['bpd']:.4f}")
            if step % opt.checkpoint_every == 0 or step >= opt.num_steps or stop.flag:
                trainer.save()
            if stop.flag:
                progress.log(f"stop requested: saved step {step}, exiting")
                break
    trainer.checkpointer.wait()
    if stop.flag:
        return {"step": step, "stopped": True}
    result = trainer.evaluate()
    step = int(trainer.state.step)
    writer.write(step, {f"eval_{k}": v for k, v in result.items()})
    return result | {"samples": trainer.sample(step, writer), "step": step}


def _restored_trainer(config, workdir: str) -> Trainer:
    trainer = Trainer(config, workdir)
    if trainer.checkpointer.latest_step() is None:
        raise ckpt_lib.CheckpointError(f"no checkpoint in {paths.join(workdir, 'checkpoints')}: train first")
    trainer.restore_latest()
    return trainer


def evaluate_checkpoint(config, workdir: str) -> dict:
    """--mode eval: test bits/dim of the latest checkpoint (EMA parameters)."""
    trainer = _restored_trainer(config, workdir)
    result = trainer.evaluate() | {"step": int(trainer.state.step)}
    trainer.checkpointer.close()
    return result


def sample_checkpoint(config, workdir: str) -> dict:
    """--mode sample: samples (.npz, .png, TensorBoard) from the latest checkpoint."""
    trainer = _restored_trainer(config, workdir)
    step = int(trainer.state.step)
    with metrics_lib.MetricWriter(workdir) as writer:
        path = trainer.sample(step, writer)
    trainer.checkpointer.close()
    return {"samples": path, "step": step}
