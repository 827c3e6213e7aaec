"""Tests for the VDM score networks in ``vdm.nets``.

Every entry of ``NETWORKS`` is checked for the shared interface
``eps_hat = net(z, gamma, *, dropout_rng=None)`` with tiny sizes so the file
runs in well under a minute on CPU. Networks are built once per module and
all forward passes are jit-compiled through a few shared functions (modules
are pytrees in NNX), so identical network structures reuse compilations.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from vdm import options
from vdm.nets import MLP, NETWORKS, MultiResUNet, ScoreUNet, build, fourier_features, kernels, timestep_embedding
from vdm.nets.kernels import Convolutions
from vdm.nets.layers import normalize_gamma, num_groups

GAMMA_MIN, GAMMA_MAX = -13.3, 5.0

# Tiny configurations: name -> (constructor kwargs, shape of z).
CONFIGS = {
    "unet": (
        dict(in_channels=1, channels=8, num_blocks=2, attention=True, dropout=0.2, scan_blocks=True, remat=True),
        (3, 8, 8, 1),
    ),
    "multires_unet": (
        dict(in_channels=2, channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), dropout=0.2),
        (3, 8, 8, 2),
    ),
    "mlp": (dict(in_channels=2, hidden=16, depth=2, dropout=0.2), (3, 2)),
}
NAMES = sorted(NETWORKS)


def test_configs_cover_all_networks():
    assert set(CONFIGS) == set(NETWORKS)


def make(name: str, seed: int = 0, **overrides) -> nnx.Module:
    kwargs, _ = CONFIGS[name]
    return build(name, **{**kwargs, "gamma_min": GAMMA_MIN, "gamma_max": GAMMA_MAX, **overrides}, rngs=nnx.Rngs(seed))


def inputs(name: str, seed: int = 1) -> tuple[jax.Array, jax.Array]:
    _, shape = CONFIGS[name]
    z = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
    gamma = jnp.linspace(GAMMA_MIN, GAMMA_MAX, shape[0], dtype=jnp.float32)
    return z, gamma


@jax.jit
def apply(net, z, gamma, key=None):
    """Jitted forward pass; the network is an ordinary pytree argument."""
    return net(z, gamma, dropout_rng=key)


def perturb(net, seed, scale=0.1):
    """Returns a copy of ``net`` with ``scale * N(0, 1)`` noise added to every parameter.

    Makes the zero-initialised layers active. The noise is drawn on the host
    with numpy, which avoids compiling a random-number kernel per parameter shape.
    """
    graphdef, state = nnx.split(net)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    leaves = [jnp.asarray(np.asarray(x) + scale * rng.standard_normal(x.shape).astype(x.dtype)) for x in leaves]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


@pytest.fixture(scope="module", autouse=True)
def fast_cpu_rng():
    """Non-partitionable threefry while this module runs.

    With ``jax_threefry_partitionable=True`` (the default in recent JAX) the XLA
    CPU compilation of every eagerly executed random initialiser of a new shape
    takes seconds, which dominates the runtime of these tiny networks.
    """
    with jax.threefry_partitionable(False):
        yield


@pytest.fixture(scope="module")
def nets():
    """name -> (network at init, perturbed copy)."""
    out = {}
    for name in NAMES:
        net = make(name)
        out[name] = (net, perturb(net, 42))
    return out


# ---------------------------------------------------------------------------
# Interface, initialisation and conditioning.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_and_zero_init(nets, name):
    net, _ = nets[name]
    z, gamma = inputs(name)
    out = apply(net, z, gamma)
    assert out.shape == z.shape
    assert out.dtype == jnp.float32
    assert np.all(np.asarray(out) == 0.0), "zero-initialised head must give eps_hat == 0 at init"
    # The head is zero even with dropout active.
    assert np.all(np.asarray(apply(net, z, gamma, jax.random.key(0))) == 0.0)
    params = jax.tree.leaves(nnx.state(net, nnx.Param))
    assert params and all(p.dtype == jnp.float32 for p in params)


@pytest.mark.parametrize("name", NAMES)
def test_output_depends_on_gamma_and_z(nets, name):
    _, net = nets[name]
    z, gamma = inputs(name)
    out = np.asarray(apply(net, z, gamma))
    assert np.all(np.isfinite(out))
    assert np.abs(out).max() > 1e-3
    # Different gamma, same z.
    out_gamma = np.asarray(apply(net, z, gamma[::-1]))
    for i in range(len(gamma)):
        if gamma[i] != gamma[::-1][i]:
            assert np.abs(out[i] - out_gamma[i]).max() > 1e-4, f"example {i} ignores gamma"
    # Different z, same gamma.
    z2, _ = inputs(name, seed=7)
    out_z = np.asarray(apply(net, z2, gamma))
    assert np.abs(out - out_z).max(axis=tuple(range(1, out.ndim))).min() > 1e-4
    # A scalar gamma is broadcast over the batch.
    np.testing.assert_allclose(
        np.asarray(apply(net, z, gamma[1])), np.asarray(apply(net, z, jnp.full_like(gamma, gamma[1]))), atol=1e-6
    )


@pytest.mark.parametrize("name", NAMES)
def test_a_gamma_per_element(name):
    """gamma of z's shape: the embedding takes its per-example mean (so a network built without the map sees a
    constant map as the scalar it is), and a network built with ``gamma_map`` also reads the map per element:
    changing gamma at one element changes its output, a constant map equals the per-example gamma."""
    z, gamma = inputs(name)
    per_element = jnp.broadcast_to(gamma.reshape((-1,) + (1,) * (z.ndim - 1)), z.shape)
    plain = perturb(make(name), 42)
    np.testing.assert_allclose(np.asarray(apply(plain, z, per_element)), np.asarray(apply(plain, z, gamma)),
                               rtol=1e-5, atol=1e-5)
    mapped = perturb(make(name, gamma_map=True), 42)
    constant = np.asarray(apply(mapped, z, per_element))
    np.testing.assert_allclose(constant, np.asarray(apply(mapped, z, gamma)), rtol=1e-5, atol=1e-5)
    # Raise gamma at one element and lower it at another by the same amount: the mean (the embedding) is unchanged,
    # so only the map can move the output.
    first, second = ((0, 0), (0, 1)) if z.ndim == 2 else ((0, 0, 0, 0), (0, 0, 1, 0))
    moved = per_element.at[first].add(3.0).at[second].add(-3.0)
    assert float(jnp.mean(moved[0])) == pytest.approx(float(jnp.mean(per_element[0])), abs=1e-5)
    changed = np.asarray(apply(mapped, z, moved))
    assert np.abs(changed[0] - constant[0]).max() > 1e-4
    np.testing.assert_allclose(changed[1:], constant[1:], rtol=1e-5, atol=1e-5)  # the other examples are untouched
    np.testing.assert_allclose(np.asarray(apply(plain, z, moved)), np.asarray(apply(plain, z, per_element)),
                               rtol=1e-5, atol=1e-5)  # without the map only the mean counts


@jax.jit
def apply_cond(net, z, gamma, cond):
    return net(z, gamma, cond)


@pytest.mark.parametrize("name", NAMES)
def test_class_conditioning(name):
    """Each example's output depends on its own label; cond=None is the null class; unconditional nets refuse labels."""
    net = perturb(make(name, num_classes=3), 5)
    z, gamma = inputs(name)
    labels = jnp.array([0, 1, 2])
    out = np.asarray(apply_cond(net, z, gamma, {"label": labels}))
    changed = np.asarray(apply_cond(net, z, gamma, {"label": jnp.array([0, 2, 2])}))
    per_example = np.abs(out - changed).max(axis=tuple(range(1, out.ndim)))
    assert per_example[0] == 0 and per_example[2] == 0 and per_example[1] > 1e-4
    null = np.asarray(apply_cond(net, z, gamma, {"label": jnp.full((3,), 3)}))
    np.testing.assert_array_equal(np.asarray(apply_cond(net, z, gamma, None)), null)
    with pytest.raises(ValueError, match="num_classes=0"):
        apply_cond(make(name), z, gamma, {"label": labels})


@pytest.mark.parametrize("name", NAMES)
def test_dropout_only_with_key_and_reproducible(nets, name):
    _, net = nets[name]
    z, gamma = inputs(name)
    det1, det2 = apply(net, z, gamma), apply(net, z, gamma)
    np.testing.assert_array_equal(np.asarray(det1), np.asarray(det2))
    k1, k2 = jax.random.key(1), jax.random.key(2)
    a, a_again, b = apply(net, z, gamma, k1), apply(net, z, gamma, k1), apply(net, z, gamma, k2)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(a_again))
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4
    assert np.abs(np.asarray(a) - np.asarray(det1)).max() > 1e-4
    # Eager execution agrees with the jitted function.
    if name != "unet":  # eager nnx.scan is slow to run op by op; jit is what training uses.
        np.testing.assert_allclose(np.asarray(net(z, gamma, dropout_rng=k1)), np.asarray(a), atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_batch_independence(nets, name):
    _, net = nets[name]
    z, gamma = inputs(name)
    full = np.asarray(apply(net, z[:2], gamma[:2]))
    for i in range(2):
        alone = np.asarray(apply(net, z[i : i + 1], gamma[i : i + 1]))
        np.testing.assert_allclose(alone[0], full[i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_nnx_jit_matches_jax_jit(nets, name):
    _, net = nets[name]
    z, gamma = inputs(name)
    out = nnx.jit(lambda m, z, g: m(z, g))(net, z, gamma)
    np.testing.assert_allclose(np.asarray(out), np.asarray(apply(net, z, gamma)), atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_compute(nets, name):
    _, net32 = nets[name]
    # Abstract construction (no initialisers run), then the float32 parameters are loaded.
    net16 = nnx.eval_shape(lambda: make(name, dtype=jnp.bfloat16))
    nnx.update(net16, nnx.state(net32))
    params = jax.tree.leaves(nnx.state(net16, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params)
    z, gamma = inputs(name)
    out32 = np.asarray(apply(net32, z, gamma))
    out16 = apply(net16, z, gamma)
    assert out16.dtype == jnp.float32 and out16.shape == z.shape
    err = np.abs(np.asarray(out16) - out32).max()
    assert err < 0.05 * np.abs(out32).max() + 1e-3, err


# ---------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_gradients_and_training(nets, name):
    """Adam on a fixed regression batch: finite gradients that reach the whole body, decreasing loss."""
    net, _ = nets[name]
    graphdef, params, rest = nnx.split(net, nnx.Param, ...)
    z, gamma = inputs(name)
    target = jax.random.normal(jax.random.key(3), z.shape)
    opt = optax.adam(3e-3)

    def loss_fn(params, key):
        eps_hat = nnx.merge(graphdef, params, rest)(z, gamma, dropout_rng=key)
        return jnp.mean((eps_hat - target) ** 2)

    @jax.jit
    def step(params, opt_state, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, key)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    opt_state = opt.init(params)
    losses, grads_per_step = [], []
    for i in range(20):
        params, opt_state, loss, grads = step(params, opt_state, jax.random.fold_in(jax.random.key(0), i))
        losses.append(float(loss))
        grads_per_step.append(grads)

    def is_head(path):
        return any("_out" in str(k) for k in path)

    def nonzero(g):
        return bool(np.any(np.asarray(g) != 0))

    for grads in grads_per_step:
        assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
    # At init only the zero-initialised head gets gradient ...
    first = jax.tree.leaves_with_path(grads_per_step[0])
    assert any(nonzero(g) for p, g in first if is_head(p))
    # ... after one optimiser step the gradient reaches past it ...
    second = jax.tree.leaves_with_path(grads_per_step[1])
    assert any(nonzero(g) for p, g in second if not is_head(p)), "gradient does not reach past the head"
    # ... and after a few steps every parameter receives gradient (no dead zero-initialised paths).
    dead = [jax.tree_util.keystr(p) for p, g in jax.tree.leaves_with_path(grads_per_step[-1]) if not nonzero(g)]
    assert not dead, dead
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.9 * losses[0], losses


# ---------------------------------------------------------------------------
# ScoreUNet: scanned and unrolled stacks are the same function.
# ---------------------------------------------------------------------------


def copy_stacked_into_unrolled(scanned: ScoreUNet, unrolled: ScoreUNet) -> None:
    """Sets ``unrolled``'s parameters so it computes the same function as ``scanned``.

    Stage ``i`` of the unrolled ``down`` / ``up`` lists receives slice ``i`` of
    the corresponding stacked parameters; all other parameters are copied.
    """
    src = dict(nnx.to_flat_state(nnx.state(scanned, nnx.Param)))

    def value_for(path, var):
        if path[0] in ("down", "up"):
            return var.copy(src[(path[0], *path[2:])].get_value()[path[1]])
        return var.copy(src[path].get_value())

    nnx.update(unrolled, nnx.map_state(value_for, nnx.state(unrolled, nnx.Param)))


def test_scanned_and_unrolled_unet_agree(nets):
    """Given the same parameters the scanned (and rematerialised) and unrolled U-Nets agree.

    Checked with and without dropout, so the per-stage dropout keys match too.
    """
    _, scanned = nets["unet"]
    kwargs, _ = CONFIGS["unet"]
    num_blocks = kwargs["num_blocks"]
    assert scanned.scan_blocks and scanned.remat
    # Stacked along a leading axis of size num_blocks (down) and num_blocks + 1 (up).
    assert {x.shape[0] for x in jax.tree.leaves(nnx.state(scanned.down, nnx.Param))} == {num_blocks}
    assert {x.shape[0] for x in jax.tree.leaves(nnx.state(scanned.up, nnx.Param))} == {num_blocks + 1}

    unrolled = nnx.eval_shape(lambda: make("unet", scan_blocks=False, remat=False))
    assert isinstance(unrolled.down, nnx.List) and len(unrolled.down) == num_blocks
    copy_stacked_into_unrolled(scanned, unrolled)

    z, gamma = inputs("unet")
    for key in (None, jax.random.key(9)):
        a, b = np.asarray(apply(scanned, z, gamma, key)), np.asarray(apply(unrolled, z, gamma, key))
        assert np.abs(a).max() > 1e-3
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------
# MultiResUNet resolution handling.
# ---------------------------------------------------------------------------


def test_multires_unet_sizes():
    # Abstract parameters suffice: the size check happens while tracing.
    net = nnx.eval_shape(
        lambda: MultiResUNet(1, channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, rngs=nnx.Rngs(0))
    )
    gamma = jnp.zeros((2,))
    for size in (28, 8):  # 28 -> 14 -> 7 and 8 -> 4 -> 2
        out = jax.eval_shape(lambda m, z, g: m(z, g), net, jnp.zeros((2, size, size, 1)), gamma)
        assert out.shape == (2, size, size, 1) and out.dtype == jnp.float32
    with pytest.raises(ValueError, match="divisible by 4"):
        jax.eval_shape(lambda m, z, g: m(z, g), net, jnp.zeros((2, 14, 14, 1)), gamma)
    with pytest.raises(ValueError, match="divisible by 4"):
        jax.eval_shape(lambda m, z, g: m(z, g), net, jnp.zeros((2, 8, 6, 1)), gamma)


@pytest.mark.parametrize(
    "net",
    [
        lambda: ScoreUNet(3, channels=8, num_blocks=1, with_fourier_features=False, scan_blocks=False, rngs=nnx.Rngs(0)),
        lambda: MultiResUNet(
            3, channels=8, channel_mult=(1,), mid_attention=False, resample_with_conv=False, rngs=nnx.Rngs(0)
        ),
        lambda: MultiResUNet(3, channels=8, channel_mult=(1, 1), resample_with_conv=False, rngs=nnx.Rngs(0)),
    ],
)
def test_option_variants_shapes(net):
    net = nnx.eval_shape(net)  # abstract parameters: only shapes are traced
    z = jax.ShapeDtypeStruct((2, 4, 6, 3), jnp.float32)
    out = jax.eval_shape(lambda m, z: m(z, jnp.zeros((2,))), net, z)
    assert out.shape == z.shape and out.dtype == jnp.float32


# ---------------------------------------------------------------------------
# Feature functions against direct numpy formulas.
# ---------------------------------------------------------------------------


def test_fourier_features_match_numpy():
    z = np.random.default_rng(0).uniform(-1, 1, size=(2, 3, 3, 2)).astype(np.float32)
    got = np.asarray(fourier_features(jnp.asarray(z), 6, 7))
    sins, coss = [], []
    for c in range(z.shape[-1]):
        for n in (6, 7):
            sins.append(np.sin(2.0**n * 2 * np.pi * z[..., c].astype(np.float64)))
            coss.append(np.cos(2.0**n * 2 * np.pi * z[..., c].astype(np.float64)))
    expected = np.stack(sins + coss, axis=-1)
    assert got.shape == (2, 3, 3, 8)
    np.testing.assert_allclose(got, expected, atol=2e-4)
    with pytest.raises(ValueError):
        fourier_features(jnp.asarray(z), 7, 6)


@pytest.mark.parametrize("dim", [16, 9])
def test_timestep_embedding_matches_numpy(dim):
    t = np.array([0.0, 0.25, 1.0], np.float64)
    got = np.asarray(timestep_embedding(jnp.asarray(t, jnp.float32), dim))
    half = dim // 2
    freqs = np.exp(-math.log(10_000) * np.arange(half) / (half - 1))
    args = 1000 * t[:, None] * freqs[None, :]
    expected = np.concatenate([np.sin(args), np.cos(args)], axis=1)
    if dim % 2:
        expected = np.concatenate([expected, np.zeros((3, 1))], axis=1)
    assert got.shape == (3, dim)
    np.testing.assert_allclose(got, expected, atol=5e-4)


NHWC = ("NHWC", "HWIO", "NHWC")
CONV_CASES = [
    ((2, 6, 5, 3), (3, 3, 3, 4), (1, 1), "SAME"),  # custom-derivative path
    ((2, 6, 5, 3), (1, 3, 3, 4), (1, 1), ((0, 0), (1, 1))),  # custom-derivative path, explicit padding
    ((1, 28, 28, 128), (3, 3, 128, 128), (1, 1), "SAME"),  # custom, weight gradient by matmuls on CPU ("auto")
    ((1, 28, 30, 128), (1, 3, 128, 128), (1, 1), ((0, 0), (1, 1))),  # the same, 1 x 3 kernel
    ((2, 6, 6, 3), (3, 3, 3, 4), (2, 2), "SAME"),  # custom, stride 2 (even size: padding (0, 1))
    ((2, 7, 5, 3), (3, 3, 3, 4), (2, 2), "SAME"),  # custom, stride 2 (odd sizes: padding (1, 1))
    ((2, 6, 6, 3), (3, 3, 3, 4), (1, 1), "VALID"),  # forwarded to lax
]


def conv_case(shape, kernel, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal(shape), jnp.float32), jnp.asarray(rng.standard_normal(kernel), jnp.float32))


@pytest.mark.parametrize("shape, kernel, strides, padding", CONV_CASES)
def test_conv_matches_lax_with_gradients(shape, kernel, strides, padding):
    x, w = conv_case(shape, kernel)

    def loss(conv, x, w):
        y = conv(x, w, strides, padding, dimension_numbers=NHWC)
        return jnp.sum(jnp.sin(y)), y

    (_, y1), g1 = jax.value_and_grad(partial(loss, Convolutions()), argnums=(0, 1), has_aux=True)(x, w)
    (_, y2), g2 = jax.value_and_grad(partial(loss, jax.lax.conv_general_dilated), argnums=(0, 1), has_aux=True)(x, w)
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y2), atol=1e-5)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


def equations(jaxpr) -> list:
    """Every equation of a jaxpr, those of its sub-jaxprs (scan, jit, custom derivatives, ...) included."""
    found = []
    for eqn in (jaxpr if hasattr(jaxpr, "eqns") else jaxpr.jaxpr).eqns:
        found.append(eqn)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    found += equations(sub)
    return found


def conv_ops(jaxpr) -> list:
    """Every ``conv_general_dilated`` equation of a jaxpr, sub-jaxprs (scan, jit, ...) included."""
    return [eqn for eqn in equations(jaxpr) if eqn.primitive.name == "conv_general_dilated"]


def has_custom_conv_rule(jaxpr) -> bool:
    """Whether a convolution of ``jaxpr`` carries a custom derivative (``kernels``' own rule): a ``custom_jvp_call``
    whose body holds a convolution. Other custom derivatives (jax's softmax has one since jax 0.12.1) do not count."""
    return any(eqn.primitive.name == "custom_jvp_call" and conv_ops(eqn.params["call_jaxpr"])
               for eqn in equations(jaxpr))


def is_canonical(eqn) -> bool:
    """NHWC/HWIO/NHWC without dilation: the layout XLA:CPU's fast convolution kernels take."""
    p = eqn.params
    want = jax.lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), NHWC)
    return p["dimension_numbers"] == want and set(p["lhs_dilation"]) == {1} and set(p["rhs_dilation"]) == {1}


@pytest.mark.parametrize("form", ["conv", "matmul"])
@pytest.mark.parametrize("shape, kernel, strides, padding", [CONV_CASES[i] for i in (0, 1, 4, 5)])
def test_custom_derivatives_of_both_forms_in_both_modes(shape, kernel, strides, padding, form):
    """Gradient (reverse mode) and jvp (forward mode) of the custom convolution equal lax's, for each
    weight-gradient form and stride; the backward pass holds canonical convolutions only, lax's does not."""
    x, w = conv_case(shape, kernel)
    dx, dw = conv_case(shape, kernel, seed=1)
    custom = Convolutions("custom", form)

    def conv(fn):
        return lambda x, w: fn(x, w, strides, padding, dimension_numbers=NHWC)

    def loss(fn):
        return lambda x, w: jnp.sum(jnp.sin(conv(fn)(x, w)))

    for a, b in zip(jax.grad(loss(custom), (0, 1))(x, w), jax.grad(loss(jax.lax.conv_general_dilated), (0, 1))(x, w)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)
    for tangents in ((dx, dw), (dx, jnp.zeros_like(w)), (jnp.zeros_like(x), dw)):
        got = jax.jvp(conv(custom), (x, w), tangents)
        want = jax.jvp(conv(jax.lax.conv_general_dilated), (x, w), tangents)
        for a, b in zip(got, want):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)
    backward = conv_ops(jax.make_jaxpr(jax.grad(loss(custom), (0, 1)))(x, w))
    assert len(backward) == (3 if form == "conv" else 2) and all(map(is_canonical, backward))
    assert not all(map(is_canonical, conv_ops(jax.make_jaxpr(jax.grad(loss(jax.lax.conv_general_dilated), (0, 1)))(x, w))))
    # Forward mode in the input alone (the ODE likelihood's divergence): canonical convolutions as well.
    forward = conv_ops(jax.make_jaxpr(lambda x, v: jax.jvp(lambda x: conv(custom)(x, w), (x,), (v,)))(x, dx))
    assert len(forward) == 2 and all(map(is_canonical, forward))


def test_conv_gradient_inside_scan_matches_lax():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 6, 5, 4)), jnp.float32)
    ws = jnp.asarray(0.3 * rng.standard_normal((3, 3, 3, 4, 4)), jnp.float32)

    def loss(conv, x, ws):
        def body(h, w):
            return h + jax.nn.swish(conv(h, w, (1, 1), "SAME", dimension_numbers=NHWC)), None

        return jnp.sum(jax.lax.scan(body, x, ws)[0] ** 2)

    g1 = jax.jit(jax.grad(partial(loss, Convolutions()), argnums=(0, 1)))(x, ws)
    g2 = jax.jit(jax.grad(partial(loss, jax.lax.conv_general_dilated), argnums=(0, 1)))(x, ws)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


def test_the_custom_conv_gradient_is_taken_on_the_cpu_only_unless_asked_for(monkeypatch):
    """``auto`` takes the custom derivatives where they were measured to win (the CPU) and XLA's own on
    other backends; ``custom`` and ``plain`` force either; a bad name is a one-line error."""
    x, w = jnp.ones((1, 6, 6, 2)), jnp.ones((3, 3, 2, 2))

    def takes_custom_derivatives(conv) -> bool:
        f = lambda w: jnp.sum(conv(x, w, (1, 1), "SAME", dimension_numbers=NHWC))
        return has_custom_conv_rule(jax.make_jaxpr(f)(w))

    assert Convolutions().uses_custom_gradient("cpu") and not Convolutions().uses_custom_gradient("gpu")
    assert not Convolutions().uses_custom_gradient("tpu")
    assert takes_custom_derivatives(Convolutions())  # this test runs on the CPU
    assert not takes_custom_derivatives(Convolutions("plain"))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not takes_custom_derivatives(Convolutions())
    assert takes_custom_derivatives(Convolutions("custom"))
    assert not takes_custom_derivatives(Convolutions("plain"))
    with pytest.raises(ValueError, match="^convolution_gradient='fast': valid names: auto, custom, plain$"):
        Convolutions("fast")
    with pytest.raises(ValueError, match="^weight_gradient='dot': valid names: auto, conv, matmul$"):
        Convolutions(weight_gradient="dot")


def test_the_convolution_setting_is_a_value_of_the_network_not_state():
    """No module-level mutable state: the setting is a frozen, hashable value that every ``nnx.Conv``
    of a network holds in its graphdef; two settings used side by side keep their own."""
    assert not [name for name, value in vars(kernels).items()
                if not name.startswith("__") and isinstance(value, (list, dict, set, bytearray))]
    setting = Convolutions("plain", "matmul")
    assert setting == Convolutions("plain", "matmul") and hash(setting) == hash(Convolutions("plain", "matmul"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        setting.gradient = "custom"
    for name in ("unet", "multires_unet"):
        net = nnx.eval_shape(lambda: make(name, convolutions=setting))
        convs = [node for _, node in nnx.iter_graph(net) if isinstance(node, nnx.Conv)]
        assert convs and all(c.conv_general_dilated is setting for c in convs)
        # In the graphdef (static): equal settings give equal graphdefs (one compilation), others do not.
        assert nnx.graphdef(net) == nnx.graphdef(nnx.eval_shape(lambda: make(name, convolutions=setting)))
        assert nnx.graphdef(net) != nnx.graphdef(nnx.eval_shape(lambda: make(name)))
    z, _ = inputs("unet")
    plain, custom = (nnx.eval_shape(lambda g=g: make("unet", convolutions=Convolutions(g))) for g in ("plain", "custom"))
    assert not takes_custom(plain, z) and takes_custom(custom, z) and not takes_custom(plain, z)


def takes_custom(net, z) -> bool:
    """Whether ``net`` (concrete or abstract) computes its convolutions with the custom derivatives."""
    graphdef, state = nnx.split(net)
    call = lambda state, z: nnx.merge(graphdef, state)(z, jnp.zeros((z.shape[0],)))
    return has_custom_conv_rule(jax.make_jaxpr(call)(state, z))


def test_network_derivatives_with_custom_convolutions_equal_plain(nets):
    """A network (the scanned, rematerialised U-Net) has the same jvp in z (the ODE likelihood's
    divergence) and the same parameter gradients with the custom convolution derivatives as with
    XLA's own; with the custom ones both hold canonical convolutions only, inside the scan too
    (XLA:CPU's fast kernels). The stride-2 convolution in a network: test_model's ODE likelihood."""
    name = "unet"
    _, custom = nets[name]  # built with the default setting: the custom derivatives on this CPU
    plain = nnx.eval_shape(lambda: make(name, convolutions=Convolutions("plain")))
    nnx.update(plain, nnx.state(custom))
    z, gamma = inputs(name)
    v = jax.random.normal(jax.random.key(5), z.shape)

    def derivatives(params, graphdef):
        out = lambda params, z: nnx.merge(graphdef, params)(z, gamma)
        return jax.jvp(lambda z: out(params, z), (z,), (v,)), jax.grad(lambda p: jnp.sum(jnp.sin(out(p, z))))(params)

    results = []
    for net in (custom, plain):
        graphdef, params = nnx.split(net, nnx.Param)
        if net is custom:
            assert takes_custom(net, z) and all(map(is_canonical, conv_ops(jax.make_jaxpr(derivatives, static_argnums=1)(
                params, graphdef))))
        quick = {"xla_backend_optimization_level": 0}  # compiles in half the time; values are all that is compared
        results.append(jax.jit(derivatives, static_argnums=1).lower(params, graphdef).compile(quick)(params))
    (jvp_custom, g_custom), (jvp_plain, g_plain) = results
    assert np.abs(np.asarray(jvp_custom[1])).max() > 1e-3
    for a, b in zip(jvp_custom, jvp_plain):  # float32 sums in another order: relative to the largest entry
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * np.abs(np.asarray(b)).max())
    g_custom, g_plain = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]) for g in (g_custom, g_plain))
    assert np.linalg.norm(g_custom - g_plain) <= 1e-5 * np.linalg.norm(g_plain)


def test_num_groups():
    # VDM's 32 groups at the paper's widths; at least 4 channels per group for narrow nets.
    assert [num_groups(c) for c in (256, 128, 64, 32, 16, 8, 12, 9, 3)] == [32, 32, 16, 8, 4, 2, 3, 1, 1]


def test_normalize_gamma():
    g = jnp.array([GAMMA_MIN, (GAMMA_MIN + GAMMA_MAX) / 2, GAMMA_MAX])
    np.testing.assert_allclose(np.asarray(normalize_gamma(g, GAMMA_MIN, GAMMA_MAX)), [0.0, 0.5, 1.0], atol=1e-6)



@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_a_network_built_directly_checks_its_gamma_range_as_the_schedule_does(name):
    with pytest.raises(options.OptionError, match="^gamma_min=5.0: must be below gamma_max=5.0$"):
        make(name, gamma_min=5.0, gamma_max=5.0)


# ---------------------------------------------------------------------------
# Registry.
# ---------------------------------------------------------------------------


def test_registry():
    assert NETWORKS == {"unet": ScoreUNet, "multires_unet": MultiResUNet, "mlp": MLP}
    with pytest.raises(ValueError, match="unknown network 'resnet'; valid names: ") as info:
        build("resnet")
    assert all(name in str(info.value) for name in NETWORKS)


@pytest.mark.parametrize("name", NAMES)
def test_declared_input_rank_matches_what_the_network_takes(nets, name):
    net, _ = nets[name]
    z, gamma = inputs(name)
    assert z.ndim == NETWORKS[name].input_rank
    with pytest.raises(ValueError, match="expected z of shape"):
        apply(net, z.reshape(z.shape[0], -1) if z.ndim == 4 else z[:, None, None, :], gamma)


@pytest.mark.parametrize("name", NAMES)
def test_remat_changes_memory_not_the_function(name):
    """Rematerialisation recomputes activations in the backward pass: same outputs, same gradients.

    With plain convolutions: the custom ones rematerialise a piece of their own (``vdm.nets.kernels``),
    which would hide whether the blocks are."""
    z, gamma = inputs(name)
    results, checkpointed = [], []
    for remat in (False, True):
        net = perturb(make(name, remat=remat, convolutions=Convolutions("plain")), 11)
        graphdef, params = nnx.split(net, nnx.Param)

        def loss(params, graphdef=graphdef):
            return jnp.sum(nnx.merge(graphdef, params)(z, gamma) ** 2)

        results.append(jax.jit(jax.value_and_grad(loss))(params))
        checkpointed.append("remat" in str(jax.make_jaxpr(jax.grad(loss))(params)))
    assert checkpointed == [False, True]  # the blocks really are rematerialised
    (l0, g0), (l1, g1) = results
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
    # float32 summation order differs when activations are recomputed: compare the whole gradient vector
    g0, g1 = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]) for g in (g0, g1))
    assert np.linalg.norm(g1 - g0) <= 1e-5 * np.linalg.norm(g0)
