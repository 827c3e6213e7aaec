"""Samplers: from z_1 ~ N(0, I) to z_0, then to data through the decoder; ``SAMPLERS``, filled by ``register``.

Interface: ``sampler(rng, eps_fn, gamma_fn, z_1, cond=None, *, num_steps, **kwargs) -> (z_0, nfe)``
where ``eps_fn(z_t, gamma_t, cond)`` returns eps_hat, ``gamma_fn`` follows
``vdm.diffusion`` (gamma per example [B] or per element of z) and ``nfe`` is the number of network
evaluations it took (an int32 scalar; the adaptive ODE solver decides it at run time). ``cond`` is passed to ``eps_fn``
untouched: classifier-free guidance is part of the ``eps_fn`` the model hands in, so every
sampler supports it. ``kwargs`` come from ``config.sample.sampler_kwargs``.

Each sampler is written as a loop, a :class:`Plan` (``init``, ``step(i, carry)`` for
``i < num_steps``, ``result``), by a *plan function* ``plan(rng, eps_fn, gamma_fn, batch, cond, *,
num_steps, **options) -> Plan`` (``vdm.sampler_plan``: the contract). :func:`register` makes the one-call
sampler above of it (:func:`stepped`), keeps the plan function as ``sampler.plan`` and adds the sampler
to ``SAMPLERS``. The trainer runs a plan in chunks of steps, one compiled call each (:func:`advance`), so
a long sampling shows progress and stops promptly on a signal; chunks give the same z_0 as one call.
A new sampler, here or in a user's module, is a plan function decorated with ``@register(name,
example=...)``; a new option of a shipped sampler gets its check in ``OPTIONS`` (a user's sampler checks its
own in its plan function). ``vdm.testing.check_piece("sampler", name)``
runs the contract's checks on it.

Options (``config.sample.sampler_kwargs``) are checked in one place, :func:`check_options`: an
option means the same in every sampler that takes it, so ``OPTIONS`` holds one check per option
name (type, finiteness, range). Every sampler runs it on its keyword arguments (:func:`stepped`),
and ``vdm.configlib.validate`` asks it before anything is compiled.

Conventions (those of ``vdm.diffusion``): alpha_t^2 = sigmoid(-gamma_t), sigma_t^2 =
sigmoid(gamma_t), SNR = exp(-gamma), x_hat = (z_t - sigma_t eps_hat) / alpha_t, all element-wise,
so a schedule whose gamma differs per element works in every sampler. The probability-flow ODE
(PF-ODE) and its adaptive solve are in ``vdm.ode_sampler``.

| sampler | what | network calls |
| --- | --- | --- |
| ``ancestral`` | VDM's p(z_s | z_t) (Kingma et al. 2021, App. A.4) | num_steps |
| ``ddim`` | DDIM (Song, Meng, Ermon 2021) with ``eta``; eta = 1 is ``ancestral``, eta = 0 the deterministic first-order solver of the PF-ODE | num_steps |
| ``dpm_solver_2m`` | DPM-Solver++(2M) (Lu et al. 2022): second-order multistep, deterministic, in log-SNR | num_steps |
| ``ode`` | the PF-ODE solved adaptively by diffrax (Tsit5 or Dopri5, PID step-size control) | decided by rtol/atol |

The fixed-step samplers take ``spacing``: ``"time"`` (t uniform, the schedule's own
spacing: the default) or ``"logsnr"`` (uniform in gamma between the endpoints, per element): ``SPACINGS``.
The adaptive solvers are ``SOLVERS`` (``vdm.ode_sampler``).
"""
from __future__ import annotations

import functools
import types
from collections.abc import Mapping
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from vdm import diffusion, ode_sampler, options, registry, sampler_plan
from vdm.ode_sampler import SOLVERS, SolverError, naming_max_steps, pf_ode_drift, solve_ode  # noqa: F401 (re-exported)
from vdm.sampler_plan import Example, Plan, PlanFunction, Sampler, advance, run  # noqa: F401 (re-exported)

# name (config.sample.sampler) -> the Sampler; filled by @register
SAMPLERS: registry.Registry[Sampler] = registry.Registry("sampler", sampler_plan.contract)


def _fixed_steps(num_steps: int, step: Callable) -> Plan:
    """The plan of a sampler whose carry is z_t and which calls the network once a step."""
    return Plan(num_steps, lambda z_1: z_1, step, lambda z_0: (z_0, jnp.int32(num_steps)))


def stepped(plan_fn: PlanFunction) -> Sampler:
    """The sampler of a plan function, unregistered (:func:`register` registers it).

    Args:
        plan_fn: ``plan_fn(rng, eps_fn, gamma_fn, batch, cond, *, num_steps, **options) -> Plan``.

    Returns:
        ``sampler(rng, eps_fn, gamma_fn, z_1, cond=None, **kwargs) -> (z_0, nfe)``, which runs the plan in one
        call; ``sampler.plan`` is ``plan_fn``. Both check the options ``kwargs`` first (:func:`check_options`):
        the samplers themselves never re-check them.
    """
    @functools.wraps(plan_fn)
    def plan(rng, eps_fn, gamma_fn, batch, cond=None, **kwargs):
        check_options(kwargs)
        return plan_fn(rng, eps_fn, gamma_fn, batch, cond, **kwargs)

    @functools.wraps(plan_fn)
    def sampler(rng, eps_fn, gamma_fn, z_1, cond=None, **kwargs):
        return run(plan(rng, eps_fn, gamma_fn, z_1.shape[0], cond, **kwargs), z_1)

    sampler.plan = plan
    return sampler


def register(name: str, *, example: Example | tuple[Example, ...] | None = None) -> Callable[[PlanFunction], Sampler]:
    """Register the sampler of a plan function as ``name`` (a decorator)::

        @samplers.register("my_sampler", example=samplers.Example(deterministic=True))
        def my_sampler(rng, eps_fn, gamma_fn, batch, cond=None, *, num_steps: int, spacing: str = "time") -> Plan:
            ...

    Args:
        name: the name ``config.sample.sampler`` gives.
        example: what the contract checks (``vdm.testing.sampler``) run: an :class:`Example` (options,
            num_steps, whether the sampler with those options is deterministic), a tuple of them (each is
            checked), or ``None``: ``Example()``, 8 steps of the sampler's default options, stochastic.

    Returns:
        A decorator that registers ``stepped(plan_fn)`` and returns that sampler.

    Raises:
        RegistrationError: the name is taken, the example is not one, or the plan function does not meet the
            static contract (``vdm.sampler_plan.contract``).
    """
    try:
        sampler_plan.examples(example)
    except TypeError as e:
        raise registry.RegistrationError(f"sampler {name!r}: {e}") from None

    def add(plan_fn: PlanFunction) -> Sampler:
        return SAMPLERS.register(name, stepped(plan_fn) if callable(plan_fn) else plan_fn, example=example)

    return add


# name (the ``spacing`` option) -> (gamma_fn, batch, t [T + 1]) -> the gamma grid [T + 1, batch, ...]
SPACINGS: registry.Registry[Callable] = registry.Registry("spacing")


@SPACINGS.register("time")
def _time_spacing(gamma_fn: Callable, batch: int, t: jax.Array) -> jax.Array:
    """gamma(t) at the grid times: the schedule's own spacing."""
    return jax.vmap(lambda ti: gamma_fn(jnp.full((batch,), ti)))(t)


@SPACINGS.register("logsnr")
def _logsnr_spacing(gamma_fn: Callable, batch: int, t: jax.Array) -> jax.Array:
    """gamma uniform between the endpoints (per element, for a schedule per element): gamma(0) + t (gamma(1) - gamma(0))."""
    g1, g0 = gamma_fn(jnp.ones((batch,))), gamma_fn(jnp.zeros((batch,)))
    return g0[None] + jnp.reshape(t, (-1,) + (1,) * g0.ndim) * (g1 - g0)[None]


def gamma_grid(gamma_fn: Callable, batch: int, num_steps: int, spacing: str = "time") -> jax.Array:
    """gamma at the num_steps + 1 grid points from t = 1 down to t = 0, each [batch] (or per element):
    shape [T + 1, batch, ...]."""
    t = jnp.linspace(1.0, 0.0, num_steps + 1)
    return registry.lookup(SPACINGS, spacing, "spacing")(gamma_fn, batch, t)


def _x_hat(z, g, eps_hat):
    alpha, sigma = diffusion.alpha_sigma(diffusion.expand_to(g, z))
    return (z - sigma * eps_hat) / alpha


@register("ancestral")
def ancestral(rng: jax.Array, eps_fn: Callable, gamma_fn: Callable, batch: int, cond=None, *,
              num_steps: int) -> Plan:
    """The ancestral sampler of VDM (Kingma et al. 2021, App. A.4), T = ``num_steps``.

    For t = i / T and s = (i - 1) / T, i = T..1, sample z_s ~ p(z_s | z_t) = q(z_s | z_t, x = x_hat):

        c   = 1 - SNR(t) / SNR(s) = -expm1(gamma_s - gamma_t)
        z_s = (alpha_s / alpha_t) (z_t - sigma_t c eps_hat) + sqrt(sigma_s^2 c) eps.
    """
    def step(i, z_t):
        t = jnp.full((batch,), (num_steps - i) / num_steps)
        s = t - 1.0 / num_steps
        g_t, g_s = gamma_fn(t), gamma_fn(s)
        eps_hat = eps_fn(z_t, g_t, cond)
        g_t, g_s = diffusion.expand_to(g_t, z_t), diffusion.expand_to(g_s, z_t)
        c = -jnp.expm1(g_s - g_t)
        ratio = jnp.exp(0.5 * (jax.nn.log_sigmoid(-g_s) - jax.nn.log_sigmoid(-g_t)))  # alpha_s / alpha_t
        sigma_t = jnp.exp(0.5 * jax.nn.log_sigmoid(g_t))
        noise_std = jnp.sqrt(jax.nn.sigmoid(g_s) * c)
        eps = jax.random.normal(jax.random.fold_in(rng, i), z_t.shape, z_t.dtype)
        return ratio * (z_t - sigma_t * c * eps_hat) + noise_std * eps

    return _fixed_steps(num_steps, step)


@register("ddim", example=(Example(deterministic=True), Example({"eta": 1.0}),
                          Example({"spacing": "logsnr"}, deterministic=True)))
def ddim(rng: jax.Array, eps_fn: Callable, gamma_fn: Callable, batch: int, cond=None, *, num_steps: int,
         eta: float = 0.0, spacing: str = "time") -> Plan:
    """DDIM (Song, Meng & Ermon 2021, Eq. 12) on a grid of ``num_steps`` steps.

    From z_t to z_s with x_hat, eps_hat from one network call and c = -expm1(gamma_s - gamma_t):

        v   = eta^2 sigma_s^2 c                       (eta = 1: the posterior variance of q(z_s | z_t, x))
        z_s = alpha_s x_hat + sqrt(sigma_s^2 - v) eps_hat + sqrt(v) xi,     xi ~ N(0, I).

    eta = 1 is the ancestral sampler (the same update, rewritten); eta = 0 is deterministic:
    the first-order exponential integrator of the PF-ODE (DPM-Solver++(1)), invertible by
    ``ddim_invert``.
    """
    grid = gamma_grid(gamma_fn, batch, num_steps, spacing)

    def step(i, z_t):
        g_t, g_s = grid[i], grid[i + 1]
        eps_hat = eps_fn(z_t, g_t, cond)
        x_hat = _x_hat(z_t, g_t, eps_hat)
        g_t, g_s = diffusion.expand_to(g_t, z_t), diffusion.expand_to(g_s, z_t)
        alpha_s, sigma_s = diffusion.alpha_sigma(g_s)
        c = -jnp.expm1(g_s - g_t)
        keep = jnp.sqrt(jnp.clip(1.0 - eta**2 * c, 0.0, 1.0))  # sqrt(sigma_s^2 - v) / sigma_s
        z_s = alpha_s * x_hat + sigma_s * keep * eps_hat
        if eta:
            z_s = z_s + sigma_s * eta * jnp.sqrt(c) * jax.random.normal(jax.random.fold_in(rng, i), z_t.shape)
        return z_s

    return _fixed_steps(num_steps, step)


def ddim_invert(eps_fn: Callable, gamma_fn: Callable, z_0: jax.Array, cond=None, *, num_steps: int,
                spacing: str = "time") -> jax.Array:
    """The deterministic DDIM run backwards, z_0 -> z_1 (the encoder of Song et al. 2021, Sec. 4.3).

    Each step z_s -> z_t uses eps_hat at (z_s, gamma_s): z_t = alpha_t x_hat + sigma_t eps_hat.
    ``ddim(eta=0)`` of its output returns z_0 up to the discretisation error of both.
    """
    grid = gamma_grid(gamma_fn, z_0.shape[0], num_steps, spacing)[::-1]

    def step(i, z_s):
        g_s, g_t = grid[i], grid[i + 1]
        eps_hat = eps_fn(z_s, g_s, cond)
        x_hat = _x_hat(z_s, g_s, eps_hat)
        alpha_t, sigma_t = diffusion.alpha_sigma(diffusion.expand_to(g_t, z_s))
        return alpha_t * x_hat + sigma_t * eps_hat

    return jax.lax.fori_loop(0, num_steps, step, z_0)


@register("dpm_solver_2m", example=Example(deterministic=True))
def dpm_solver_2m(rng: jax.Array, eps_fn: Callable, gamma_fn: Callable, batch: int, cond=None, *,
                  num_steps: int, spacing: str = "logsnr") -> Plan:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): a second-order multistep solver of the PF-ODE.

    With lambda = log(alpha / sigma) = -gamma / 2, h_i = lambda_i - lambda_{i-1}, r_i = h_{i-1} / h_i
    and x_hat_i the data prediction at grid point i:

        D_i     = (1 + 1 / (2 r_i)) x_hat_{i-1} - x_hat_{i-2} / (2 r_i)       (D_1 = x_hat_0: first order)
        z_i     = (sigma_i / sigma_{i-1}) z_{i-1} - alpha_i expm1(-h_i) D_i.

    One network call per step; the last step is first order (as in the paper's code), which
    keeps the few-step samples stable. Deterministic: ``rng`` is unused.
    """
    del rng
    grid = gamma_grid(gamma_fn, batch, num_steps, spacing)
    lam = -0.5 * grid

    def step(i, carry):
        z, x_prev = carry
        g_t, g_s = grid[i], grid[i + 1]
        x_hat = _x_hat(z, g_t, eps_fn(z, g_t, cond))
        h = diffusion.expand_to(lam[i + 1] - lam[i], z)
        h_prev = diffusion.expand_to(lam[i] - lam[jnp.maximum(i - 1, 0)], z)
        r = h_prev / h
        second = (1.0 + 0.5 / r) * x_hat - (0.5 / r) * x_prev
        use_second = (i > 0) & (i < num_steps - 1)
        d = jnp.where(use_second, second, x_hat)
        alpha_s, sigma_s = diffusion.alpha_sigma(diffusion.expand_to(g_s, z))
        _, sigma_t = diffusion.alpha_sigma(diffusion.expand_to(g_t, z))
        return (sigma_s / sigma_t) * z - alpha_s * jnp.expm1(-h) * d, x_hat

    return Plan(num_steps, lambda z_1: (z_1, jnp.zeros_like(z_1)), step, lambda carry: (carry[0], jnp.int32(num_steps)))


# The probability-flow ODE solved adaptively (vdm.ode_sampler); segments=2: its plan has steps to run in chunks.
ode = register("ode", example=Example({"segments": 2}, deterministic=True))(ode_sampler.ode)


# Option name -> check(name, value), for every keyword option of every shipped sampler but num_steps (the caller's).
# A fixed table: a user's sampler checks its own new options in its plan function.
OPTIONS = types.MappingProxyType({
    "eta": functools.partial(options.in_range, low=0.0, high=1.0, meaning="(0: deterministic, 1: ancestral)"),
    "spacing": functools.partial(options.choice, table=SPACINGS),
    "solver": functools.partial(options.choice, table=SOLVERS),
    "rtol": options.positive,
    "atol": options.positive,
    "max_steps": options.positive_int,
    "segments": options.positive_int,
})


def check_options(kwargs: Mapping) -> None:
    """Check sampler options (``config.sample.sampler_kwargs``): type, finiteness and range of each.

    Raises ``vdm.options.OptionError`` naming the option. Options that no sampler takes are left
    to the call (and to ``vdm.configlib``, which checks them against the sampler's signature).
    """
    options.check_all(OPTIONS, kwargs)


def build(name: str) -> Sampler:
    """The sampler registered as ``name``.

    Raises:
        ValueError: an unknown name (naming every valid one).
    """
    return SAMPLERS.lookup(name)


def decode_samples(rng: jax.Array, z_0: jax.Array, gamma_0: jax.Array, vocab_size: int) -> jax.Array:
    """Draw x ~ p(x | z_0) from the discretised decoder; integers in {0..V-1}, int32."""
    log_probs = diffusion.decoder_log_probs(z_0, gamma_0, vocab_size)
    return jax.random.categorical(rng, log_probs, axis=-1).astype(jnp.int32)


class Generation(NamedTuple):
    """Sampling from the model as three parts: ``z_1`` (the noise), ``plan`` (z_1 -> z_0) and
    ``decode`` (z_0 -> integers), so that the plan's steps can run in chunks."""

    z_1: jax.Array
    plan: Plan
    decode: Callable[[jax.Array], jax.Array]

    def run(self) -> tuple[jax.Array, jax.Array]:
        """All of it in one call: (integers [B, ...], nfe)."""
        z_0, nfe = run(self.plan, self.z_1)
        return self.decode(z_0), nfe


def generation(rng: jax.Array, eps_fn: Callable, gamma_fn: Callable, shape: tuple, *, num_steps: int,
               vocab_size: int, sampler: str = "ancestral", cond=None, **sampler_kwargs) -> Generation:
    """Samples of the model: z_1 ~ N(0, I) of ``shape`` -> z_0 -> x, as a :class:`Generation`."""
    rng_z, rng_steps, rng_x = jax.random.split(rng, 3)
    plan = build(sampler).plan(rng_steps, eps_fn, gamma_fn, shape[0], cond, num_steps=num_steps, **sampler_kwargs)
    gamma_0 = gamma_fn(jnp.zeros((shape[0],)))
    return Generation(jax.random.normal(rng_z, shape), plan,
                      lambda z_0: decode_samples(rng_x, z_0, gamma_0, vocab_size))


def generate(rng: jax.Array, eps_fn: Callable, gamma_fn: Callable, shape: tuple, **kwargs) -> tuple[jax.Array, jax.Array]:
    """Samples of the model in one call: (integers [B, ...], nfe); ``kwargs`` as for :func:`generation`."""
    return generation(rng, eps_fn, gamma_fn, shape, **kwargs).run()
