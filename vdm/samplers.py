"""Samplers: from z_1 ~ N(0, I) to z_0, then to data through the decoder.

Interface: ``sampler(rng, eps_fn, gamma_fn, z_1, cond=None, *, num_steps, **kwargs) -> (z_0, nfe)``
where ``eps_fn(z_t, gamma_t, cond)`` returns eps_hat, ``gamma_fn`` follows
``vdm.diffusion`` (gamma per example [B] or per element of z) and ``nfe`` is the number of network
evaluations it took (an int32 scalar; the adaptive ODE solver decides it at run time). ``cond`` is passed to ``eps_fn``
untouched: classifier-free guidance is part of the ``eps_fn`` the model hands in, so every
sampler supports it. ``kwargs`` come from ``config.sample.sampler_kwargs``.

Each sampler is written as a loop, a :class:`Plan` (``init``, ``step(i, carry)`` for
``i < num_steps``, ``result``), by a function decorated with :func:`stepped`, which makes the
one-call sampler above of it and keeps the plan as ``sampler.plan``. The trainer runs a plan
in chunks of steps, one compiled call each (:func:`advance`), so a long sampling shows
progress and stops promptly on a signal; chunks give the same z_0 as one call. A new sampler
is one such function here plus its entry in ``SAMPLERS``, and any new option its check in ``OPTIONS``.

Options (``config.sample.sampler_kwargs``) are checked in one place, :func:`check_options`: an
option means the same in every sampler that takes it, so ``OPTIONS`` holds one check per option
name (type, finiteness, range). Every sampler runs it on its keyword arguments (:func:`stepped`),
and ``vdm.configlib.validate`` asks it before anything is compiled.

Conventions (those of ``vdm.diffusion``): alpha_t^2 = sigmoid(-gamma_t), sigma_t^2 =
sigmoid(gamma_t), SNR = exp(-gamma), x_hat = (z_t - sigma_t eps_hat) / alpha_t, all element-wise,
so a schedule whose gamma differs per element works in every sampler. The probability-flow ODE
(Song et al. 2021) of this variance-preserving process, over t and per element i, is

    dz_i / dt = gamma_i'(t) (sigma_i eps_hat_i(z, gamma_t) - sigma_i^2 z_i) / 2      (PF-ODE)

(with a scalar gamma, gamma itself could be the time variable; over t, one schedule per element
works too, and gamma'(t) comes from ``jax.jvp`` of the schedule as in the loss).

| sampler | what | network calls |
| --- | --- | --- |
| ``ancestral`` | VDM's p(z_s | z_t) (Kingma et al. 2021, App. A.4) | num_steps |
| ``ddim`` | DDIM (Song, Meng, Ermon 2021) with ``eta``; eta = 1 is ``ancestral``, eta = 0 the deterministic first-order solver of the PF-ODE | num_steps |
| ``dpm_solver_2m`` | DPM-Solver++(2M) (Lu et al. 2022): second-order multistep, deterministic, in log-SNR | num_steps |
| ``ode`` | the PF-ODE solved adaptively by diffrax (Tsit5 or Dopri5, PID step-size control) | decided by rtol/atol |

The fixed-step samplers take ``spacing``: ``"time"`` (t uniform, the schedule's own
spacing: the default) or ``"logsnr"`` (uniform in gamma between the endpoints, per element): ``SPACINGS``.
The adaptive solvers are ``SOLVERS`` (name -> diffrax solver class name; ``vdm.ode_solver`` runs them).
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from vdm import diffusion, options, registry


class Plan(NamedTuple):
    """A sampler as a loop: ``carry = init(z_1)``; ``carry = step(i, carry)`` for i = 0..num_steps-1;
    ``(z_0, nfe) = result(carry)``. ``step`` depends on ``i`` only through its argument, so
    running the steps in several calls gives what one call gives."""

    num_steps: int
    init: Callable[[jax.Array], Any]
    step: Callable[[jax.Array, Any], Any]
    result: Callable[[Any], tuple[jax.Array, jax.Array]]


def advance(plan: Plan, carry, start, stop):
    """Steps ``start``..``stop - 1`` of ``plan`` (traced bounds: one compiled loop serves every chunk)."""
    return jax.lax.fori_loop(start, stop, plan.step, carry)


def run(plan: Plan, z_1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The whole loop in one call: z_1 -> (z_0, nfe)."""
    return plan.result(jax.lax.fori_loop(0, plan.num_steps, plan.step, plan.init(z_1)))


def _fixed_steps(num_steps: int, step: Callable) -> Plan:
    """The plan of a sampler whose carry is z_t and which calls the network once a step."""
    return Plan(num_steps, lambda z_1: z_1, step, lambda z_0: (z_0, jnp.int32(num_steps)))


def stepped(plan_fn: Callable[..., Plan]) -> Callable:
    """The sampler ``(rng, eps_fn, gamma_fn, z_1, cond=None, **kwargs) -> (z_0, nfe)`` that runs
    ``plan_fn(rng, eps_fn, gamma_fn, batch, cond, **kwargs)`` in one call; ``sampler.plan`` is
    ``plan_fn``. Both check the options ``kwargs`` first (:func:`check_options`): the samplers
    themselves never re-check them."""
    @functools.wraps(plan_fn)
    def plan(rng, eps_fn, gamma_fn, batch, cond=None, **kwargs):
        check_options(kwargs)
        return plan_fn(rng, eps_fn, gamma_fn, batch, cond, **kwargs)

    @functools.wraps(plan_fn)
    def sampler(rng, eps_fn, gamma_fn, z_1, cond=None, **kwargs):
        return run(plan(rng, eps_fn, gamma_fn, z_1.shape[0], cond, **kwargs), z_1)

    sampler.plan = plan
    return sampler


def _time_spacing(gamma_fn: Callable, batch: int, t: jax.Array) -> jax.Array:
    """gamma(t) at the grid times: the schedule's own spacing."""
    return jax.vmap(lambda ti: gamma_fn(jnp.full((batch,), ti)))(t)


def _logsnr_spacing(gamma_fn: Callable, batch: int, t: jax.Array) -> jax.Array:
    """gamma uniform between the endpoints (per element, for a schedule per element): gamma(0) + t (gamma(1) - gamma(0))."""
    g1, g0 = gamma_fn(jnp.ones((batch,))), gamma_fn(jnp.zeros((batch,)))
    return g0[None] + jnp.reshape(t, (-1,) + (1,) * g0.ndim) * (g1 - g0)[None]


SPACINGS = {"time": _time_spacing, "logsnr": _logsnr_spacing}  # name -> (gamma_fn, batch, t [T + 1]) -> gamma grid


def gamma_grid(gamma_fn: Callable, batch: int, num_steps: int, spacing: str = "time") -> jax.Array:
    """gamma at the num_steps + 1 grid points from t = 1 down to t = 0, each [batch] (or per element):
    shape [T + 1, batch, ...]."""
    t = jnp.linspace(1.0, 0.0, num_steps + 1)
    return registry.lookup(SPACINGS, spacing, "spacing")(gamma_fn, batch, t)


def _x_hat(z, g, eps_hat):
    alpha, sigma = diffusion.alpha_sigma(diffusion.expand_to(g, z))
    return (z - sigma * eps_hat) / alpha


@stepped
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


@stepped
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


@stepped
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


def pf_ode_drift(eps_fn: Callable, gamma_fn: Callable, cond=None) -> Callable:
    """(t, z) -> dz / dt of the probability-flow ODE (PF-ODE above), t a scalar."""
    def drift(t, z):
        tt = jnp.full((z.shape[0],), t, z.dtype)
        gamma, rate = jax.jvp(gamma_fn, (tt,), (jnp.ones_like(tt),))
        sigma_sq = jax.nn.sigmoid(diffusion.expand_to(gamma, z))
        return 0.5 * diffusion.expand_to(rate, z) * (jnp.sqrt(sigma_sq) * eps_fn(z, gamma, cond) - sigma_sq * z)
    return drift


SOLVERS = {"tsit5": "Tsit5", "dopri5": "Dopri5"}  # name -> the diffrax solver class's name


class SolverError(RuntimeError):
    """An adaptive ODE solve ran out of steps before the end of its interval (one line)."""


@contextlib.contextmanager
def naming_max_steps(field: str):
    """Within it, diffrax's "maximum number of solver steps" (raised inside a compiled call, it reaches
    Python as a JAX runtime error) becomes a one-line SolverError naming the config ``field``."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - only the solver's running out of steps is turned into one line
        if "maximum number of solver steps was reached" not in str(e):
            raise
        raise SolverError(f"the adaptive ODE solver used all {field} steps before the end of its interval: "
                          "raise it, or loosen rtol / atol") from None


def solve_ode(vector_field: Callable, y0, t_start: jax.Array, t_end: jax.Array, *, rtol: float,
              atol: float, solver: str = "tsit5", max_steps: int = 4096, on_progress: Callable | None = None):
    """diffrax: integrate dy/dt = vector_field(t, y) from t_start to t_end.

    Returns (y at t_end, network evaluations). Tsit5 and Dopri5 are 7-stage methods whose
    last stage is the next step's first (FSAL): 6 new evaluations per attempted step plus one.
    ``on_progress``: called on the host with the fraction of the interval done after each step (a
    ``jax.debug.callback``: diffrax's progress meter).
    """
    solver_class = registry.lookup(SOLVERS, solver, "ODE solver")
    from vdm import ode_solver  # diffrax: imported when an ODE is first solved (0.6 s), see vdm.ode_solver

    return ode_solver.solve(vector_field, y0, t_start, t_end, rtol=rtol, atol=atol, solver_class=solver_class,
                            max_steps=max_steps, on_progress=on_progress)


@stepped
def ode(rng: jax.Array, eps_fn: Callable, gamma_fn: Callable, batch: int, cond=None, *, num_steps: int = 0,
        rtol: float = 1e-4, atol: float = 1e-4, solver: str = "tsit5", max_steps: int = 4096,
        segments: int = 1) -> Plan:
    """The PF-ODE from t = 1 down to t = 0, solved adaptively by diffrax (Kidger 2021).

    ``num_steps`` is not used: the PID controller picks the steps for ``rtol``/``atol``
    (score_sde's sampler uses RK45 at 1e-5). Deterministic: ``rng`` is unused. ``segments`` > 1
    solves the ODE over that many equal t intervals in turn (each with its own step-size start, a
    few more evaluations): the trainer then shows progress and can stop between them.
    """
    del rng, num_steps
    edges = jnp.linspace(1.0, 0.0, segments + 1)
    drift = pf_ode_drift(eps_fn, gamma_fn, cond)

    def step(i, carry):
        z, nfe = carry
        z, n = solve_ode(drift, z, edges[i], edges[i + 1], rtol=rtol, atol=atol, solver=solver, max_steps=max_steps)
        return z, nfe + n

    return Plan(segments, lambda z_1: (z_1, jnp.int32(0)), step, lambda carry: carry)


SAMPLERS = {
    "ancestral": ancestral,
    "ddim": ddim,
    "dpm_solver_2m": dpm_solver_2m,
    "ode": ode,
}


# Option name -> check(name, value), for every keyword option of every sampler but num_steps (the caller's).
OPTIONS = {
    "eta": functools.partial(options.in_range, low=0.0, high=1.0, meaning="(0: deterministic, 1: ancestral)"),
    "spacing": functools.partial(options.choice, table=SPACINGS),
    "solver": functools.partial(options.choice, table=SOLVERS),
    "rtol": options.positive,
    "atol": options.positive,
    "max_steps": options.positive_int,
    "segments": options.positive_int,
}


def check_options(kwargs: Mapping) -> None:
    """Check sampler options (``config.sample.sampler_kwargs``): type, finiteness and range of each.

    Raises ``vdm.options.OptionError`` naming the option. Options that no sampler takes are left
    to the call (and to ``vdm.configlib``, which checks them against the sampler's signature).
    """
    options.check_all(OPTIONS, kwargs)


def build(name: str):
    """The sampler called ``name``."""
    return registry.lookup(SAMPLERS, name, "sampler")


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
