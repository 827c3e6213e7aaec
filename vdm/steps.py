"""The training state and the train step: what one optimizer step does to the state.

``model_initializer`` builds a config's model (its static structure, its parameters for a
seed, and which of them get weight decay); ``initial_state`` the ``TrainState`` a run starts
from; ``make_train_step`` the function that ``vdm.compilation`` compiles. The objective belongs
to the model (``vdm.model.loss_and_grads``): the step only applies the gradients, keeps the
EMA, the importance-sampling density and the record of unhealthy steps (``vdm.health``).
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from vdm import (configlib, data as data_lib, diffusion, health as health_lib, model as model_lib,
                 objective as objective_lib, weight_decay)


@struct.dataclass
class TrainState:
    """Everything that changes during training, in one pytree (and one checkpoint)."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    rng: jax.Array  # uint32[2] raw PRNG key; step keys are fold_in(rng, step)
    params: Any  # pure dict of the model's nnx.Param values
    opt_state: Any
    ema_params: Any
    density: Any  # log-SNR density for importance sampling, or None
    health: health_lib.Health


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


def initial_state(seed: int, params, tx: optax.GradientTransformation, objective: objective_lib.Objective) -> TrainState:
    """Step 0 of a run: ``params`` (and their copy as the EMA), the optimizer's and the objective's initial state."""
    return TrainState(step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(seed), params=params,
                      opt_state=tx.init(params), ema_params=jax.tree_util.tree_map(jnp.copy, params),
                      density=objective.initial_density(), health=health_lib.Health.initial())


def make_train_step(graphdef, tx: optax.GradientTransformation, objective: objective_lib.Objective, ema_decay: float,
                    limits: health_lib.Limits = health_lib.Limits()):
    """state, batch of k steps {"image": [k, B, ...], ...} -> (state after k optimizer steps, metrics of the last).

    ``limits``: when a finite step counts as diverged (``vdm.health``); such a step, like a non-finite one,
    is not applied."""

    def one_step(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        loss, grads, estimate = objective_lib.loss_and_grads(graphdef, state.params, batch, rng, objective,
                                                             state.density)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
        ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
        num_dims = math.prod(batch["image"].shape[1:])
        bits = {f"bpd_{name}": jnp.mean(diffusion.bits_per_dim(v, num_dims)) for name, v in estimate.nats.items()}
        grad_norm = optax.tree.norm(grads)
        checked = (*bits.values(), loss, *estimate.diagnostics.values(), grad_norm)  # in the order of health.CHECKED
        bad_terms = sum(jnp.where(jnp.isfinite(v), 0, 1 << i) for i, v in enumerate(checked)).astype(jnp.int32)
        bad_terms |= state.health.spikes(loss, grad_norm, limits)
        health = state.health.after(state.step + 1, bad_terms, loss, grad_norm)
        bound = jnp.mean(diffusion.bits_per_dim(sum(estimate.nats.values()), num_dims))
        logged = {"bpd": bound} | bits | {"loss": loss} | estimate.diagnostics | {
            "grad_norm": grad_norm, "skipped_steps": health.skipped}
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema,
                            density=estimate.density)
        # An unhealthy (non-finite or diverged) step is never applied: all but the step count and the record stays.
        kept = jax.tree_util.tree_map(lambda old, upd: jnp.where(bad_terms != 0, old, upd), state, new)
        return kept.replace(step=state.step + 1, health=health), logged

    def train_step(state, batch):
        state, logged = jax.lax.scan(one_step, state, batch)
        return state, jax.tree_util.tree_map(lambda m: m[-1], logged)

    return train_step
