"""Training, evaluation and sampling: one flat trainer that reads top to bottom.

``train_and_evaluate(config, workdir)`` is the whole program behind
``python -m vdm.main --mode train``; ``evaluate_checkpoint`` and ``sample_checkpoint``
are the ``eval`` and ``sample`` modes. Everything random is a function of
(config.seed, step), and the data order is a function of (seed, step), so a run resumed
from a checkpoint continues exactly as the uninterrupted run would have.
"""
from __future__ import annotations

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
from jax.sharding import NamedSharding, PartitionSpec as P

from vdm import checkpoint as ckpt_lib
from vdm import configlib, data as data_lib, diffusion, metrics as metrics_lib, parallel, schedules, time_sampling
from vdm.model import VDM, LossSettings, evaluation_terms, generate, training_loss, training_times

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


def build_model(config, info: data_lib.DatasetInfo, seed: int) -> tuple[nnx.GraphDef, dict]:
    """(graphdef, params): the static structure and the initial parameters as a pure dict.

    The initialisers run inside one ``jax.jit`` (one compilation instead of one per
    parameter shape, which is what makes eager NNX construction slow on CPU); the values
    are the same as eager construction.
    """
    def make():
        return VDM.from_config(config, image_shape=info.shape, vocab_size=info.vocab_size, rngs=nnx.Rngs(seed))

    graphdef, _, rest = nnx.split(nnx.eval_shape(make), nnx.Param, ...)
    if jax.tree_util.tree_leaves(rest):
        raise configlib.ConfigError(f"model holds non-parameter state {list(nnx.to_pure_dict(rest))}")
    params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(make(), nnx.Param)))()
    return graphdef, params


def _decay_mask(params):
    """Weight decay on the network's kernels only: not biases, norm scales or the schedule.

    By name, not by rank: scanned blocks stack their biases into rank-2 arrays.
    """
    def keep(path, x):
        return getattr(path[-1], "key", None) == "kernel" and getattr(path[0], "key", None) != "schedule"
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(config) -> optax.GradientTransformation:
    t = config.train
    # Linear warm-up lr * (step + 1) / warmup_steps, so that the very first step already moves.
    warmup = max(int(t.warmup_steps), 1)
    lr = optax.join_schedules([optax.linear_schedule(t.lr / warmup, t.lr, warmup - 1), optax.constant_schedule(t.lr)],
                              [warmup - 1])
    adamw = optax.adamw(lr, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay, mask=_decay_mask)
    return optax.chain(optax.clip_by_global_norm(t.grad_clip), adamw) if t.grad_clip > 0 else adamw


def make_density(config):
    lo = config.loss
    if not lo.importance_sampling:
        return None
    w = LossSettings.from_config(config).weighting
    return time_sampling.build_density(lo.importance_sampling, w, -config.model.gamma_max, -config.model.gamma_min,
                                       num_bins=lo.density_bins)


def initial_state(config, params, tx) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(config.seed), params=params,
                      opt_state=tx.init(params), ema_params=jax.tree_util.tree_map(jnp.copy, params),
                      density=make_density(config))


# --------------------------------------------------------------------------------------
# The compiled steps
# --------------------------------------------------------------------------------------

LOGGED = ("loss", "bpd", "bpd_prior", "bpd_reconstruction", "bpd_diffusion", "gamma_0", "gamma_1")


def _grads_with_schedule_variance(graphdef, params, rng, x, settings):
    """VLB gradients for everything but the schedule interior, which gets d E[L^2] (VDM App. I.2)."""
    model = nnx.merge(graphdef, params)
    graph2, interior, other = nnx.split(model, schedules.ScheduleShape, ...)
    t = training_times(rng, x.shape[0], settings)  # the times training_loss(rng) draws

    def shape_fn(interior, t):
        return nnx.merge(graph2, interior, other).schedule.shape(t)

    def per_example(other, s, ds):
        m = nnx.merge(graph2, jax.lax.stop_gradient(interior), other)
        _, metrics = training_loss(m, rng, x, settings, levels=(s, ds))
        return metrics["per_example_loss"], metrics["diffusion_nats"], metrics

    (_, metrics), g_other, g_interior = diffusion.value_and_grad_with_schedule_variance(
        per_example, shape_fn, interior, other, t)
    return metrics, nnx.to_pure_dict(nnx.merge_state(g_other, g_interior))


def make_train_step(graphdef, tx, config):
    """state, batch [k, B, ...] -> (state after k optimizer steps, metrics of the last)."""
    settings = LossSettings.from_config(config)
    ema_decay = config.train.ema_decay
    trace_count = [0]

    def one_step(state: TrainState, x):
        rng = jax.random.fold_in(state.rng, state.step)
        if settings.variance_schedule_grad:
            metrics, grads = _grads_with_schedule_variance(graphdef, state.params, rng, x, settings)
        else:
            def loss_fn(params):
                return training_loss(nnx.merge(graphdef, params), rng, x, settings, density=state.density)
            (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
        ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
        density = state.density
        if isinstance(density, time_sampling.AdaptiveDensity):
            density = density.update(metrics["logsnr"], metrics["integrand"])
        logged = {k: metrics[k] for k in LOGGED}
        logged["grad_norm"] = optax.tree.norm(grads)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema, density=density)
        return new, logged

    def train_step(state, batch):
        trace_count[0] += 1
        state, metrics = jax.lax.scan(one_step, state, batch)
        return state, jax.tree_util.tree_map(lambda m: m[-1], metrics)

    train_step.trace_count = trace_count
    return train_step


def make_eval_step(graphdef, config):
    """Sums over one padded batch of the per-example VLB terms (bits/dim), masked."""
    def eval_step(params, x, mask, rng):
        terms = evaluation_terms(nnx.merge(graphdef, params), rng, x, num_steps=config.eval.num_steps)
        scale = 1.0 / (math.prod(x.shape[1:]) * math.log(2.0))
        sums = {k: jnp.sum(jnp.where(mask, terms[k], 0.0)) * scale
                for k in ("total", "prior", "reconstruction", "diffusion")}
        sums["count"] = jnp.sum(mask.astype(jnp.float32))
        return sums
    return eval_step


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


class Trainer:
    """Holds the compiled functions, the mesh and the data for one workdir."""

    def __init__(self, config, workdir: str):
        configlib.validate(config)
        self.config, self.workdir = config, workdir
        parallel.maybe_initialize_distributed()
        self.mesh = parallel.make_data_mesh()
        try:
            parallel.check_batch_divisible(config.train.batch_size, self.mesh)
        except ValueError as e:
            raise configlib.ConfigError(str(e)) from None
        self.dataset = data_lib.load_dataset(config.data.source, **dict(config.data.kwargs))
        if config.train.batch_size > self.dataset.info.num_train:
            raise configlib.ConfigError(
                f"config.train.batch_size={config.train.batch_size}: larger than the "
                f"{self.dataset.info.num_train} training examples")
        self.graphdef, params = build_model(config, self.dataset.info, config.seed)
        self.tx = make_optimizer(config)
        self.state = initial_state(config, params, self.tx)
        self.replicated = NamedSharding(self.mesh, P())
        self.state = jax.device_put(self.state, self.replicated)
        self.train_step = make_train_step(self.graphdef, self.tx, config)
        batch_spec = NamedSharding(self.mesh, P(None, parallel.DATA_AXIS))
        self._train_step = jax.jit(self.train_step, in_shardings=(self.replicated, batch_spec),
                                   out_shardings=(self.replicated, self.replicated), donate_argnums=0)
        self._batch_spec = batch_spec
        self._eval_spec = eval_spec = NamedSharding(self.mesh, P(parallel.DATA_AXIS))
        self._eval_step = jax.jit(make_eval_step(self.graphdef, config),
                                  in_shardings=(self.replicated, eval_spec, eval_spec, self.replicated),
                                  out_shardings=self.replicated)
        self.checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                                  max_to_keep=config.train.keep_checkpoints)

    # -- data ---------------------------------------------------------------------------

    def train_batch(self, step: int):
        """The global batch [k, B, ...] for optimizer steps step .. step + k - 1, as a sharded array."""
        t = self.config.train
        rows = parallel.process_batch_slice(self.mesh, t.batch_size)
        host = np.stack([data_lib.train_batch(self.dataset.train.images, t.batch_size, seed=self.config.seed,
                                              step=step + i)[rows] for i in range(t.steps_per_call)])
        global_shape = (t.steps_per_call, t.batch_size) + host.shape[2:]
        return jax.make_array_from_process_local_data(self._batch_spec, host, global_shape)

    # -- checkpoints --------------------------------------------------------------------

    def restore_latest(self) -> int:
        step = self.checkpointer.latest_step()
        if step is not None:
            self.state = self.checkpointer.restore(step, target=ckpt_lib.abstract_like(self.state))
        return int(self.state.step)

    def save(self, force: bool = False) -> None:
        step = int(self.state.step)
        if self.checkpointer.latest_step() != step:
            self.checkpointer.save(step, self.state, force=force)

    # -- evaluation and sampling ----------------------------------------------------------

    def evaluate(self, params=None) -> dict:
        """Bits/dim of the VLB over one complete pass of the test split (EMA parameters)."""
        params = self.state.ema_params if params is None else params
        images = self.dataset.test.images
        if self.config.eval.num_examples:
            images = images[: self.config.eval.num_examples]
        bs = self.config.eval.batch_size
        bs = -(-bs // self.mesh.size) * self.mesh.size  # round up to a multiple of the device count
        eval_spec = self._eval_spec
        rng = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), 0x5EED)
        totals: dict[str, float] = {}
        for i, batch in enumerate(data_lib.eval_batches(images, bs, process_index=jax.process_index(),
                                                        process_count=jax.process_count())):
            x = jax.make_array_from_process_local_data(eval_spec, batch.images, (bs,) + batch.images.shape[1:])
            mask = jax.make_array_from_process_local_data(eval_spec, batch.mask, (bs,))
            sums = self._eval_step(params, x, mask, jax.random.fold_in(rng, i))
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        count = totals.pop("count")
        return {("bpd" if k == "total" else f"bpd_{k}"): v / count for k, v in totals.items()} | {"count": count}

    def sample(self, path: str, params=None) -> np.ndarray:
        """Draw config.sample.num_images samples with the EMA parameters and write a PNG grid."""
        c = self.config.sample
        params = self.state.ema_params if params is None else params
        fn = jax.jit(lambda p, r: generate(nnx.merge(self.graphdef, p), r, c.num_images, num_steps=c.num_steps,
                                           sampler=c.sampler))
        images = np.asarray(fn(params, jax.random.fold_in(jax.random.PRNGKey(self.config.seed), 0xA11)))
        if jax.process_index() == 0:
            save_image_grid(path, images, self.dataset.info.vocab_size)
        return images


def save_image_grid(path: str, images: np.ndarray, vocab_size: int) -> None:
    """Write integer images [N, H, W, C] in {0..V-1} as one PNG grid (values scaled to 0..255).

    2-D point data ([N, 1, 1, 2]) is drawn as a 256 x 256 scatter plot instead.
    """
    from PIL import Image

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    n, h, w, c = images.shape
    if (h, w, c) == (1, 1, 2):
        canvas = np.full((vocab_size, vocab_size), 255, np.uint8)
        xy = images.reshape(n, 2)
        canvas[vocab_size - 1 - xy[:, 1], xy[:, 0]] = 0
        Image.fromarray(canvas).save(path)
        return
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    grid = np.zeros((rows * (h + 2) + 2, cols * (w + 2) + 2, c), np.uint8)
    scaled = np.round(images.astype(np.float64) * 255.0 / (vocab_size - 1)).astype(np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + k * (w + 2): 2 + k * (w + 2) + w] = scaled[i]
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)


class _StopRequested:
    """Set by SIGTERM/SIGINT so the loop can save a checkpoint before exiting."""

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
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def train_and_evaluate(config, workdir: str) -> dict:
    """Train (resuming from the latest checkpoint in workdir), evaluate, sample. Returns final metrics."""
    trainer = Trainer(config, workdir)  # validates config, loads data: fails before any compile
    write_config(config, workdir)
    t = config.train
    start = trainer.restore_latest()
    writer = metrics_lib.MetricWriter(workdir)
    progress = metrics_lib.Progress(t.num_steps, initial_step=start, log_every=t.log_every)
    try:
        if start:
            progress.log(f"resumed from step {start} in {workdir}")
        return _train_loop(trainer, writer, progress, start)
    finally:
        progress.close()
        writer.close()
        trainer.checkpointer.close()


def _train_loop(trainer: Trainer, writer, progress, start: int) -> dict:
    config, workdir = trainer.config, trainer.workdir
    t = config.train
    last_time, last_step = time.perf_counter(), start
    with _StopRequested() as stop:
        step = start
        while step < t.num_steps:
            trainer.state, m = trainer._train_step(trainer.state, trainer.train_batch(step))
            step += t.steps_per_call
            if step % t.log_every == 0 or step >= t.num_steps:
                m = {k: float(v) for k, v in jax.device_get(m).items()}
                now = time.perf_counter()
                rate = (step - last_step) / max(now - last_time, 1e-9)
                last_time, last_step = now, step
                m.update(steps_per_sec=rate, images_per_sec=rate * t.batch_size)
                writer.write(step, m)
                progress.update(step, loss=m["loss"], bpd=m["bpd"])
            if step % t.eval_every == 0 and step < t.num_steps:
                ev = trainer.evaluate()
                writer.write(step, {f"eval_{k}": v for k, v in ev.items()})
                progress.log(f"step {step}: test bpd {ev['bpd']:.4f}")
            if step % t.checkpoint_every == 0 or step >= t.num_steps or stop.flag:
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
    sample_path = os.path.join(workdir, f"samples_{step}.png")
    trainer.sample(sample_path)
    return result | {"samples": sample_path, "step": step}


def _restored_trainer(config, workdir: str) -> Trainer:
    trainer = Trainer(config, workdir)
    if trainer.checkpointer.latest_step() is None:
        raise ckpt_lib.CheckpointError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}: train first")
    trainer.restore_latest()
    return trainer


def evaluate_checkpoint(config, workdir: str) -> dict:
    """--mode eval: test bits/dim of the latest checkpoint (EMA parameters)."""
    trainer = _restored_trainer(config, workdir)
    result = trainer.evaluate() | {"step": int(trainer.state.step)}
    trainer.checkpointer.close()
    return result


def sample_checkpoint(config, workdir: str) -> dict:
    """--mode sample: a PNG grid of samples from the latest checkpoint."""
    trainer = _restored_trainer(config, workdir)
    path = os.path.join(workdir, f"samples_{int(trainer.state.step)}.png")
    trainer.sample(path)
    trainer.checkpointer.close()
    return {"samples": path, "step": int(trainer.state.step)}
