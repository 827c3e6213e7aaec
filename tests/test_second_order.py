"""i-DODE's second-order fine-tuning term (``vdm.second_order``) on Gaussian data with the exact velocity."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm import analytic, diffusion, second_order


@pytest.mark.parametrize("gamma", [-6.0, 0.0, 3.0])
def test_the_residual_has_mean_zero_for_the_true_velocity_and_not_for_a_wrong_one(gamma):
    """R = sigma div v_hat - alpha (d - ||v - v_hat||^2) has expectation 0 when v_hat is E[v | z_t] (the Bayes-optimal
    velocity of Gaussian data, from its closed form), within four standard errors over draws of x, eps and the
    Hutchinson probe; at the noise levels where the two differ, the velocity of data of another scale gives a mean
    many standard errors away."""
    data = analytic.GaussianData(dim=6, scale=0.6)
    n = 4000
    f = data.sample(jax.random.PRNGKey(0), n)
    g = jnp.full((n,), gamma)

    def velocity(eps_fn):
        def fn(z, gamma, cond=None):
            alpha, sigma = (diffusion.expand_to(v, z) for v in diffusion.alpha_sigma(gamma))
            return (eps_fn(z, gamma) - sigma * z) / alpha  # v = alpha eps - sigma x with x = (z - sigma eps) / alpha
        return fn

    r, _ = second_order.residual(jax.random.PRNGKey(1), f, g, velocity(data.eps_fn))
    r = np.asarray(r, np.float64)
    assert abs(r.mean()) < 4 * r.std(ddof=1) / math.sqrt(n)
    if gamma < 0:  # at high SNR every denoiser of Gaussian data is close to the identity
        return
    wrong = analytic.GaussianData(dim=6, scale=1.2)
    r_wrong, _ = second_order.residual(jax.random.PRNGKey(1), f, g, velocity(wrong.eps_fn))
    r_wrong = np.asarray(r_wrong, np.float64)
    assert abs(r_wrong.mean()) > 8 * r_wrong.std(ddof=1) / math.sqrt(n)
