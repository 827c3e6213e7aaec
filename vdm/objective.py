"""The training objective: what one step estimates, and its gradients.

    objective = Objective.from_config(config)
    loss, grads, estimate = loss_and_grads(graphdef, params, batch, rng, objective, density)
    estimate.nats          # the bound's terms per example [B], in nats, by name: their sum is the VLB
    estimate.diagnostics   # scalars worth logging (the schedule's endpoints)
    estimate.density       # the log-SNR density after the step (importance sampling), or None

A batch is a dict ``{"image": uint8 [B, H, W, C], "label": int32 [B]}`` (``label`` only when the
data have labels). ``loss_and_grads`` draws all randomness of a step from one key, once
(``draw_for_step``), and computes the bound through ``vdm.diffusion.bound``, the one road to it that
evaluation, tests, notebooks and experiments take too. The trainer knows nothing of schedules,
RNG splits or term names: it sums, logs and checks whatever ``nats`` and ``diagnostics`` hold.

Class-conditional models train with label dropout: each label is replaced by the null class
with probability ``Objective.label_dropout``, so one network learns both p(x | y) and p(x).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from vdm import diffusion, latent, moving_mean, predictions, schedules, second_order, time_sampling, weightings
from vdm.model import VDM


class ObjectiveError(ValueError):
    """An objective that cannot be trained: ``field`` (of the config's ``loss`` section), ``value``, ``problem``."""

    def __init__(self, field: str, value, problem: str):
        super().__init__(f"config.{field}={value!r}: {problem}")
        self.field, self.value, self.problem = field, value, problem


@dataclasses.dataclass(frozen=True)
class Objective:
    """What the training objective is: the config's ``loss`` section, resolved."""

    weighting: weightings.Weighting = weightings.WEIGHTINGS["elbo"]
    num_steps: int = 0  # 0: continuous time
    time_sampler: str = "low_discrepancy"
    importance_sampling: str = ""  # "", or a name in time_sampling.DENSITIES
    density_bins: int = 100
    logsnr_range: tuple[float, float] = (-5.0, 13.3)  # where importance sampling draws log-SNR
    variance_schedule_grad: bool = False
    label_dropout: float = 0.0
    prediction: str = "eps"  # the model's (``vdm.predictions``): importance sampling matches its error
    second_order_weight: float = 0.0  # i-DODE's fine-tuning term (``vdm.second_order``); 0: off
    mean_encoder: str = ""  # the model's DiffEnc mean encoder (a network's name; "": none): ``vdm.moving_mean``

    @classmethod
    def from_config(cls, config) -> "Objective":
        c = config.loss
        return cls(weighting=weightings.build(c.weighting, **dict(c.weighting_kwargs)), num_steps=int(c.timesteps),
                   time_sampler=c.time_sampler, importance_sampling=c.importance_sampling,
                   density_bins=int(c.density_bins),
                   logsnr_range=(-float(config.model.gamma_max), -float(config.model.gamma_min)),
                   variance_schedule_grad=bool(c.variance_schedule_grad), label_dropout=float(c.label_dropout),
                   prediction=config.model.prediction, second_order_weight=float(c.second_order_weight),
                   mean_encoder=config.model.mean_encoder)

    def check(self, schedule) -> None:
        """ObjectiveError when this objective cannot train ``schedule`` (a built, possibly abstract, schedule)."""
        try:
            time_sampling.check_noise_levels(num_steps=self.num_steps, importance_sampling=bool(self.importance_sampling))
        except ValueError as e:
            field = "loss.timesteps" if self.num_steps < 0 else "loss.importance_sampling"
            raise ObjectiveError(field, self.num_steps if self.num_steps < 0 else self.importance_sampling,
                                 str(e)) from None
        if self.num_steps and not self.weighting.is_elbo:
            raise ObjectiveError("loss.weighting", self.weighting.name, "discrete time (loss.timesteps > 0) trains only "
                                 "the elbo")
        # Per element first: no option of such a schedule (fixed endpoints included) lets importance sampling
        # work, so its refusal names the way out, uniform t.
        if self.importance_sampling and schedule.elementwise:
            raise ObjectiveError("loss.importance_sampling", self.importance_sampling,
                                 "draws one log-SNR per example; the schedule gives one per element, with fixed "
                                 "endpoints too: sample t uniformly instead (loss.importance_sampling='')")
        if self.importance_sampling and schedule.learns_endpoints:
            raise ObjectiveError("loss.importance_sampling", self.importance_sampling,
                                 "draws log-SNR on a fixed range; the schedule learns its endpoints (use fixed "
                                 "endpoints, e.g. model.schedule_kwargs.learn_endpoints=False)")
        if self.variance_schedule_grad:
            if schedule.conditioned:
                raise ObjectiveError("loss.variance_schedule_grad", True, "needs a schedule of t alone (this one is "
                                     "conditioned on the auxiliary latent)")
            if not schedule.learns_interior:
                raise ObjectiveError("loss.variance_schedule_grad", True, "needs a schedule with a learned interior")
            if self.num_steps or self.importance_sampling or not self.weighting.is_elbo:
                raise ObjectiveError("loss.variance_schedule_grad", True,
                                     "applies to the continuous-time elbo with uniform t only")
        if self.second_order_weight:
            if self.second_order_weight < 0:
                raise ObjectiveError("loss.second_order_weight", self.second_order_weight, "must be >= 0 (0 = off)")
            if (self.prediction != "v" or self.num_steps or self.variance_schedule_grad or self.mean_encoder
                    or schedule.elementwise):
                raise ObjectiveError("loss.second_order_weight", self.second_order_weight,
                                     "i-DODE's term is for a v-prediction (model.prediction=v) in continuous time, "
                                     "with one gamma per example and no mean encoder")
        if self.mean_encoder:
            try:
                self.check_mean_encoder(schedule.elementwise)
            except ValueError as e:
                raise ObjectiveError("model.mean_encoder", self.mean_encoder, str(e)) from None
        if not 0.0 <= self.label_dropout <= 1.0:
            raise ObjectiveError("loss.label_dropout", self.label_dropout, "must be in [0, 1]")

    def check_mean_encoder(self, elementwise: bool) -> None:
        """ValueError unless a model with a mean encoder can be trained or evaluated by this objective
        (``vdm.moving_mean.check``: the continuous-time elbo, with the schedule's own levels, gamma per example)."""
        moving_mean.check(elbo=self.weighting.is_elbo and not self.variance_schedule_grad, num_steps=self.num_steps,
                          elementwise=elementwise)

    def initial_density(self):
        """The log-SNR density that importance sampling starts from, or None (uniform t).

        It is shaped by w(lambda) b(lambda)^2, with b^2 = ||eps - eps_hat||^2 / ||target - out||^2 of the model's
        parameterisation (``predictions.prediction_error_scale``): the network's own squared error then gets one
        weight at every noise level. For eps (b = 1) that is w itself; for v with the elbo it is alpha^2 =
        sigmoid(lambda), the importance sampling of i-DODE (Zheng et al. 2023) for its velocity parameterisation.
        """
        if not self.importance_sampling:
            return None

        def shape(logsnr):
            return self.weighting(logsnr) * predictions.prediction_error_scale(self.prediction, -logsnr)

        return time_sampling.build_density(self.importance_sampling, shape, *self.logsnr_range,
                                           num_bins=self.density_bins)

    def update_density(self, density, bound: diffusion.Bound):
        """The density after one step: the adaptive one folds in this batch's integrands."""
        if not isinstance(density, time_sampling.AdaptiveDensity):
            return density
        # The trained term is 0.5 (w / p) ||eps - eps_hat||^2; the integrand is 0.5 w ||...||^2.
        return density.update(bound.logsnr, bound.weighted * jnp.exp(density.log_prob(bound.logsnr)))


# The true VLB: elbo weighting, continuous time, and iid t per image. Low-discrepancy times are
# spread over a batch's rows, so on a padded last batch the real images would see only part of
# [0, 1] (a biased bound), and per-image values would not be independent (a wrong standard error).
EVALUATION = Objective(time_sampler="iid")

TERMS = diffusion.TERMS  # the names of ``Estimate.nats``, in order
DIAGNOSTICS = ("gamma_0", "gamma_1")  # the names of ``Estimate.diagnostics``, in order


def draw_for_step(rng: jax.Array, batch_size: int, objective: Objective) -> diffusion.Draw:
    """Split one key into everything a step draws: the only place that knows the split.

    Args:
      rng: a PRNG key (the trainer's ``fold_in(state.rng, step)``).
      batch_size: B, the number of times drawn.
      objective: whose ``time_sampler`` draws the times.

    Returns:
      A ``diffusion.Draw`` with every field: ``u`` [B], and the keys of the diffusion noise, the
      reconstruction, the network's dropout, label dropout and MuLAN's auxiliary latent.
    """
    rng_diffusion, rng_reconstruction, rng_network = jax.random.split(rng, 3)
    rng_t, rng_eps = jax.random.split(rng_diffusion)
    rng_dropout, rng_labels = jax.random.split(rng_network)
    u = time_sampling.build(objective.time_sampler)(rng_t, batch_size)
    # folded in, not split: every other draw stays what it is for a model without a latent
    rng_latent = jax.random.fold_in(rng, latent.STREAM)
    return diffusion.Draw(u=u, eps=rng_eps, reconstruction=rng_reconstruction, dropout=rng_dropout, labels=rng_labels,
                          latent=rng_latent)


def estimate(model: VDM, batch: dict, d: diffusion.Draw, objective: Objective, density=None, *, train: bool = True,
             levels: time_sampling.NoiseLevels | None = None, schedule: Callable | None = None) -> diffusion.Bound:
    """``vdm.diffusion.bound`` of ``model`` on ``batch`` for the randomness ``d``.

    ``train=False`` turns dropout and label dropout off. ``levels`` replaces the noise levels (the
    variance-minimising schedule gradient differentiates through them). ``schedule`` (one that declares its
    endpoints, ``diffusion.DeclaresEndpoints``: a plain function as ``diffusion.FunctionSchedule(fn)``) replaces the
    model's own; the network sees only
    gamma_t, so with the same endpoints the expected bound is unchanged (VDM Sec. 5.1) and only the
    estimator's variance moves.
    """
    cond = model.condition(batch, d.labels, objective.label_dropout if train else 0.0)
    # MuLAN: c ~ q(c | x) conditions the schedule and the denoiser; its KL joins the prior
    cond, latent_kl = model.with_latent(batch["image"], d.latent, cond)
    gamma_fn = schedules.bind(model.schedule if schedule is None else schedule,
                              None if cond is None else cond.get("latent"))
    denoise = model.denoiser(d.dropout if train else None)
    if model.mean_encoder is not None:  # DiffEnc: the bound of the moving mean
        objective.check_mean_encoder(model.elementwise)  # for a caller that did not validate a config
        return moving_mean.bound(d, batch["image"], gamma_fn,
                                 lambda z, g, c: model.to_eps(denoise(z, g, c), z, g), model.mean_offset,
                                 vocab_size=model.vocab_size, logsnr_density=density, cond=cond)
    b = diffusion.bound(d, batch["image"], gamma_fn, denoise,
                        vocab_size=model.vocab_size, num_steps=objective.num_steps, weighting=objective.weighting,
                        prediction=model.prediction, logsnr_density=density, cond=cond, levels=levels)
    if train and objective.second_order_weight:  # i-DODE's fine-tuning: trained, not part of the bound
        same = time_sampling.noise_levels(d.u, gamma_fn, logsnr_density=density) if levels is None else levels
        extra = second_order.term(d.eps, diffusion.encode(batch["image"], model.vocab_size), same, denoise,
                                  weighting=objective.weighting, weight=objective.second_order_weight, cond=cond)
        b = b._replace(weighted=b.weighted + extra)
    return b if latent_kl is None else b.with_latent(latent_kl)


class Estimate(NamedTuple):
    """What one step of the objective gives the trainer besides the loss and its gradients."""

    nats: dict[str, jax.Array]  # the bound's terms per example [B] (``TERMS``); their sum is the VLB
    diagnostics: dict[str, jax.Array]  # scalars (``DIAGNOSTICS``): the schedule's endpoints, averaged over elements
    density: Any  # the log-SNR density after the step, or None


def _estimate(bound: diffusion.Bound, objective: Objective, density) -> Estimate:
    diagnostics = {"gamma_0": jnp.mean(bound.gamma_0), "gamma_1": jnp.mean(bound.gamma_1)}
    return Estimate(bound.terms(), diagnostics, objective.update_density(density, bound))


def loss_and_grads(graphdef: nnx.GraphDef, params, batch: dict, rng: jax.Array, objective: Objective,
                   density=None) -> tuple[jax.Array, dict, Estimate]:
    """The training loss (mean, bits/dim), its gradients w.r.t. ``params`` and the step's ``Estimate``.

    ``params`` is the pure dict of the model's parameters. With
    ``objective.variance_schedule_grad`` the schedule's interior gets the gradient of the
    estimator's second moment instead of the loss's (VDM App. I.2) and every other
    parameter the loss gradient, from the same forward and backward pass.
    """
    d = draw_for_step(rng, batch["image"].shape[0], objective)
    if objective.variance_schedule_grad:
        loss, grads, bound = _loss_and_grads_with_schedule_variance(graphdef, params, batch, d, objective)
        return loss, grads, _estimate(bound, objective, density)

    def loss_fn(params):
        model = nnx.merge(graphdef, params)
        bound = estimate(model, batch, d, objective, density)
        return diffusion.bits_per_dim(jnp.mean(bound.loss), model.num_dims), bound

    (loss, bound), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, grads, _estimate(bound, objective, density)


# --------------------------------------------------------------------------------------
# The variance-minimising schedule gradient (Kingma et al. 2021, App. I.2)
# --------------------------------------------------------------------------------------


def _loss_and_grads_with_schedule_variance(graphdef, params, batch, d: diffusion.Draw, objective: Objective):
    """VLB gradients for everything but the schedule interior, which gets d E[L^2] (VDM App. I.2), L in bits/dim."""
    model = nnx.merge(graphdef, params)
    graph2, interior, other = nnx.split(model, schedules.ScheduleShape, ...)

    def shape_fn(interior, t):
        return nnx.merge(graph2, interior, other).schedule.shape(t)

    def per_example(other, shape, slope):  # in bits/dim: the interior minimises E[L_diffusion^2] in bpd^2
        m = nnx.merge(graph2, jax.lax.stop_gradient(interior), other)
        gamma_0, gamma_1 = diffusion.schedule_endpoints(m.schedule)
        levels = time_sampling.NoiseLevels(gamma_0 + (gamma_1 - gamma_0) * shape, (gamma_1 - gamma_0) * slope)
        bound = estimate(m, batch, d, objective, levels=levels)
        return (diffusion.bits_per_dim(bound.loss, m.num_dims), diffusion.bits_per_dim(bound.weighted, m.num_dims),
                bound)

    (loss, bound), g_other, g_interior = value_and_grad_with_schedule_variance(per_example, shape_fn, interior, other,
                                                                                d.u)
    return loss, nnx.to_pure_dict(nnx.merge_state(g_other, g_interior)), bound


def value_and_grad_with_schedule_variance(per_example_fn: Callable, shape_fn: Callable,
                                          interior, other, t: jax.Array):
    """Gradients for training a schedule's interior to minimise the estimator's variance.

    In continuous time the VLB depends on the schedule only through its endpoints
    (Kingma et al. 2021, Sec. 5.1), so the VLB gradient on the *interior* of the
    schedule is zero in expectation and pure noise in practice. App. I.2 instead trains
    the interior to minimise the variance of the Monte Carlo estimate, i.e. E[L_hat^2],
    whose gradient is E[2 L_hat dL_hat/d eta]. The endpoints and every other parameter
    keep the ordinary VLB gradient.

    The schedule is gamma(t) = gamma_min + (gamma_max - gamma_min) shape(t) with
    shape(0) = 0, shape(1) = 1, and ``interior`` (eta) the parameters of ``shape``. One
    forward and one backward pass of the model give d mean(L)/d(other, s, ds) at
    s = shape(t), ds = shape'(t); the cotangents on (s, ds) are scaled per example by
    2 L_hat_i before a (cheap) backward pass through ``shape`` alone. ``shape`` may be per
    example [B] or per element.

    Args:
      per_example_fn: (other, s, ds) -> (total [B], diffusion [B], aux): the
        per-example objective and its diffusion term, computed with
        gamma_t = gamma_min + (gamma_max - gamma_min) s and
        gamma'(t) = (gamma_max - gamma_min) ds.
      shape_fn: (interior, t [B]) -> shape(t), [B] or per element.
      interior, other: parameter pytrees.
      t: the batch's times [B].

    Returns:
      (mean total, aux), grads of mean(total) w.r.t. ``other``, and grads of
      mean(diffusion^2) w.r.t. ``interior``.
    """
    def shape_and_slope(params):
        return jax.jvp(lambda tt: shape_fn(params, tt), (t,), (jnp.ones_like(t),))

    (s, ds), shape_vjp = jax.vjp(shape_and_slope, interior)

    def objective(other, s, ds):
        total, diffusion_term, aux = per_example_fn(other, s, ds)
        return jnp.mean(total), (diffusion_term, aux)

    (value, (diffusion_term, aux)), (g_other, g_s, g_ds) = jax.value_and_grad(
        objective, argnums=(0, 1, 2), has_aux=True)(other, s, ds)
    scale = diffusion.expand_to(2.0 * jax.lax.stop_gradient(diffusion_term), g_s)
    (g_interior,) = shape_vjp((scale * g_s, scale * g_ds))
    return (value, aux), g_other, g_interior
