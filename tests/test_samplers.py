"""Every sampler in SAMPLERS against the known answer for Gaussian data."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm import analytic, diffusion, samplers, schedules


@pytest.mark.parametrize("sampler", list(samplers.SAMPLERS))
@pytest.mark.parametrize("schedule", ["fixed_linear", "cosine"])
def test_sampler_with_bayes_denoiser_recovers_the_data_distribution(sampler, schedule):
    # With the exact denoiser, p(z_s | z_t) is the true reverse process, so z_0 ~ N(0, (alpha_0^2 s^2 + sigma_0^2) I).
    data = analytic.GaussianData(dim=2, scale=0.5)
    g0, g1 = -8.0, 8.0
    sched = schedules.build(schedule, gamma_min=g0, gamma_max=g1)
    n = 20000
    # z_1 from the true marginal q(z_1) (not N(0, I)), so that only the sampler is tested.
    a2, s2 = 1 / (1 + np.exp(g1)), 1 / (1 + np.exp(-g1))
    z1 = jnp.sqrt(a2 * 0.25 + s2) * jax.random.normal(jax.random.PRNGKey(0), (n, 2))
    run = samplers.build(sampler)
    z0 = jax.jit(lambda r, z: run(r, data.eps_fn, sched, z, num_steps=200))(jax.random.PRNGKey(1), z1)
    var = np.asarray(z0, np.float64).var(0)
    a2_0, s2_0 = 1 / (1 + np.exp(g0)), 1 / (1 + np.exp(-g0))
    expected = a2_0 * 0.25 + s2_0
    # Sample variance of n normals has relative standard error sqrt(2 / n) = 1%.
    np.testing.assert_allclose(var, expected, rtol=0.05)
    assert abs(float(np.mean(z0))) < 4 * np.sqrt(expected / (2 * n))


def test_decode_samples_picks_the_nearest_bin_at_low_noise():
    x = jax.random.randint(jax.random.PRNGKey(0), (8, 4, 4, 1), 0, 256)
    f = diffusion.encode(x)
    z0 = diffusion.diffuse(f, jnp.full((8,), -13.3), jax.random.normal(jax.random.PRNGKey(1), f.shape))
    decoded = samplers.decode_samples(jax.random.PRNGKey(2), z0, jnp.full((8,), -13.3), 256)
    assert float(jnp.mean(decoded == x)) > 0.95


def test_generate_shapes_and_range_and_unknown_sampler():
    sched = schedules.build("fixed_linear", gamma_min=-13.3, gamma_max=5.0)
    x = samplers.generate(jax.random.PRNGKey(0), lambda z, g, c: jnp.zeros_like(z), sched, (3, 5, 5, 1),
                          num_steps=4, vocab_size=17)
    assert x.shape == (3, 5, 5, 1) and x.dtype == jnp.int32
    assert int(x.min()) >= 0 and int(x.max()) <= 16
    with pytest.raises(ValueError, match="valid names: ancestral"):
        samplers.build("ddim")


@pytest.mark.parametrize("sampler", list(samplers.SAMPLERS))
def test_sampler_passes_cond_to_the_denoiser(sampler):
    """cond reaches eps_fn untouched: here it switches the Bayes denoiser on or off."""
    data = analytic.GaussianData(dim=2, scale=0.5)
    sched = schedules.build("fixed_linear", gamma_min=-8.0, gamma_max=8.0)

    def eps_fn(z, gamma, cond):
        return cond["on"][:, None] * data.eps_fn(z, gamma)

    z1 = jax.random.normal(jax.random.PRNGKey(0), (4000, 2))
    run = jax.jit(lambda cond: samplers.build(sampler)(jax.random.PRNGKey(1), eps_fn, sched, z1, cond, num_steps=50))
    on = np.asarray(run({"on": jnp.ones(4000)}))
    off = np.asarray(run({"on": jnp.zeros(4000)}))
    # With the denoiser the samples shrink towards the data (variance ~0.25); without it they stay wider.
    assert on.var() < 0.5 < off.var()
