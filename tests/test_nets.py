"""Tests of ``vdm.nets`` that are not the network contract: the U-Nets' own structure, the layers against
closed forms, the convolution kernel, the context and the registry.

What every network must do (shapes, zero at initialisation, conditioning, the gamma map, dropout, gradients,
remat, bfloat16) is ``vdm.testing.network``, run on every registered network by ``tests/test_contracts.py``;
here it is tried on deliberately broken networks, each of which must fail the check it breaks. Networks are
built from their registered tiny examples and their forward passes go through a few shared jitted functions, so
identical structures share compilations.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vdm import nets, options, registry, testing
from vdm.nets import (MLP, NETWORKS, MultiResUNet, NetworkContext, UNet, build, fourier_features, kernels,
                      timestep_embedding)
from vdm.nets.kernels import Convolutions
from vdm.nets.layers import normalize_gamma, num_groups
from vdm.testing import network as network_checks

GAMMA_MIN, GAMMA_MAX = network_checks.GAMMA_MIN, network_checks.GAMMA_MAX
# The scanned, rematerialised U-Net of the scanned-vs-unrolled test: two blocks (a stack), attention in the stages.
SCANNED_UNET = nets.Example({"channels": 8, "num_blocks": 2, "attention": True, "dropout": 0.2, "scan_blocks": True},
                            shape=(3, 8, 8, 1))


def example(name: str) -> nets.Example:
    return NETWORKS.entry(name).example


def make(name: str, **overrides) -> nnx.Module:
    """The network ``name`` built from its registered example; ``overrides``: context fields and kwargs."""
    context = {k: overrides.pop(k) for k in list(overrides) if k in {f.name for f in dataclasses.fields(NetworkContext)}}
    ex = example(name)
    ex = dataclasses.replace(ex, kwargs={**ex.kwargs, **overrides})
    return network_checks.build(NETWORKS[name], ex, **context)


def inputs(name: str, seed: int = 1) -> tuple[jax.Array, jax.Array]:
    return network_checks.inputs(NETWORKS[name], example(name), seed)


def apply(net, z, gamma, key=None):
    """The network's output, compiled (``vdm.testing.network.apply``: one compilation per structure)."""
    return network_checks.apply(net, z, gamma, None, key)


perturb = network_checks.perturb


@pytest.fixture(scope="module")
def unet():
    """The registered U-Net example, scanned, built with remat, its parameters moved (the head awake)."""
    return perturb(network_checks.initialise(UNet, example("unet"), remat=True), 42)


# ---------------------------------------------------------------------------
# UNet: scanned and unrolled stacks are the same function.
# ---------------------------------------------------------------------------


def copy_stacked_into_unrolled(scanned: UNet, unrolled: UNet) -> None:
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


def test_scanned_and_unrolled_unet_agree():
    """Given the same parameters the scanned (and rematerialised) and unrolled U-Nets agree.

    Checked with and without dropout, so the per-stage dropout keys match too.
    """
    scanned = perturb(network_checks.initialise(UNet, SCANNED_UNET, remat=True), 42)
    num_blocks = SCANNED_UNET.kwargs["num_blocks"]
    assert scanned.scan_blocks and scanned.remat
    # Stacked along a leading axis of size num_blocks (down) and num_blocks + 1 (up).
    assert {x.shape[0] for x in jax.tree.leaves(nnx.state(scanned.down, nnx.Param))} == {num_blocks}
    assert {x.shape[0] for x in jax.tree.leaves(nnx.state(scanned.up, nnx.Param))} == {num_blocks + 1}

    unrolled = nnx.eval_shape(lambda: network_checks.build(
        UNet, dataclasses.replace(SCANNED_UNET, kwargs={**SCANNED_UNET.kwargs, "scan_blocks": False})))
    assert isinstance(unrolled.down, nnx.List) and len(unrolled.down) == num_blocks
    copy_stacked_into_unrolled(scanned, unrolled)

    z, gamma = network_checks.inputs(UNet, SCANNED_UNET)
    # without and with dropout in one program per structure; the non-partitionable threefry (the same masks in
    # both, other draws than the default's) compiles the dropout a third faster
    both = jax.jit(lambda net, key: (net(z, gamma), net(z, gamma, dropout_rng=key)))
    with jax.threefry_partitionable(False):
        outputs = [both(net, jax.random.key(9)) for net in (scanned, unrolled)]
    for a, b in zip(*outputs):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a).max() > 1e-3
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------
# MultiResUNet resolution handling.
# ---------------------------------------------------------------------------


def test_multires_unet_sizes():
    # Abstract parameters suffice: the size check happens while tracing.
    net = nnx.eval_shape(
        lambda: MultiResUNet(NetworkContext((8, 8, 1)), channels=8, channel_mult=(1, 2, 2), num_res_blocks=1,
                             rngs=nnx.Rngs(0))
    )
    gamma = jnp.zeros((2,))
    for size in (28, 8):  # 28 -> 14 -> 7 and 8 -> 4 -> 2
        out = jax.eval_shape(lambda m, z, g: m(z, g), net, jnp.zeros((2, size, size, 1)), gamma)
        assert out.shape == (2, size, size, 1) and out.dtype == jnp.float32
    with pytest.raises(ValueError, match="divisible by 4"):
        jax.eval_shape(lambda m, z, g: m(z, g), net, jnp.zeros((2, 14, 14, 1)), gamma)
    with pytest.raises(ValueError, match="divisible by 4"):
        jax.eval_shape(lambda m, z, g: m(z, g), net, jnp.zeros((2, 8, 6, 1)), gamma)


CONTEXT_RGB = NetworkContext((4, 6, 3))


@pytest.mark.parametrize(
    "net",
    [
        lambda: UNet(CONTEXT_RGB, channels=8, num_blocks=1, with_fourier_features=False, scan_blocks=False,
                          rngs=nnx.Rngs(0)),
        lambda: MultiResUNet(CONTEXT_RGB, channels=8, channel_mult=(1,), mid_attention=False, resample_with_conv=False,
                             rngs=nnx.Rngs(0)),
        lambda: MultiResUNet(CONTEXT_RGB, channels=8, channel_mult=(1, 1), resample_with_conv=False, rngs=nnx.Rngs(0)),
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


def test_network_derivatives_with_custom_convolutions_equal_plain(unet):
    """A network (the scanned, rematerialised U-Net) has the same jvp in z (the ODE likelihood's
    divergence) and the same parameter gradients with the custom convolution derivatives as with
    XLA's own; with the custom ones both hold canonical convolutions only, inside the scan too
    (XLA:CPU's fast kernels). The stride-2 convolution in a network: test_model's ODE likelihood."""
    name = "unet"
    custom = unet  # built with the default setting: the custom derivatives on this CPU
    plain = nnx.eval_shape(lambda: make(name, remat=True, convolutions=Convolutions("plain")))
    nnx.update(plain, nnx.state(custom))
    z, gamma = inputs(name)
    v = jax.random.normal(jax.random.key(5), z.shape)

    def derivatives(params, graphdef):
        out = lambda params, z: nnx.merge(graphdef, params)(z, gamma)
        return jax.jvp(lambda z: out(params, z), (z,), (v,)), jax.grad(lambda p: jnp.sum(jnp.sin(out(p, z))))(params)

    results = []
    for net in (custom, plain):
        graphdef, params = nnx.split(net, nnx.Param)
        traced = jax.jit(derivatives, static_argnums=1).trace(params, graphdef)  # one trace: inspected and compiled
        if net is custom:
            assert takes_custom(net, z) and all(map(is_canonical, conv_ops(traced.jaxpr)))
        quick = {"xla_backend_optimization_level": 0}  # compiles in half the time; values are all that is compared
        results.append(traced.lower().compile(quick)(params))
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



# ---------------------------------------------------------------------------
# The context.
# ---------------------------------------------------------------------------


def test_the_context_checks_its_values_and_gives_each_network_its_input_size():
    with pytest.raises(options.OptionError, match="^gamma_min=5.0: must be below gamma_max=5.0$"):
        NetworkContext((8, 8, 1), gamma_min=5.0, gamma_max=5.0)
    with pytest.raises(ValueError, match=r"^data_shape=\(\): must be the shape of one example"):
        NetworkContext(())
    with pytest.raises(ValueError, match="^num_classes=-1: must be >= 0$"):
        NetworkContext((2,), num_classes=-1)
    context = NetworkContext([28, 28, 1])
    assert context.data_shape == (28, 28, 1) and hash(context) == hash(NetworkContext((28, 28, 1)))
    assert context.in_channels(4) == 1 and context.in_channels(2) == 784
    with pytest.raises(ValueError, match=r"^a network of images \[B, H, W, C\] needs data of shape \(H, W, C\); "):
        NetworkContext((2,)).in_channels(4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        context.remat = True


def test_a_network_keeps_the_fields_it_uses_not_the_context():
    """The context holds the model's Rngs-free facts; stored on a module it would join its graph."""
    net = nnx.eval_shape(lambda: make("mlp", num_classes=2, gamma_map=True))
    assert not any(isinstance(node, NetworkContext) for _, node in nnx.iter_graph(net))
    assert not any(isinstance(v, NetworkContext) for v in vars(net).values())


# ---------------------------------------------------------------------------
# Registry and contract.
# ---------------------------------------------------------------------------


def test_registry():
    assert NETWORKS == {"unet": UNet, "multires_unet": MultiResUNet, "mlp": MLP}
    assert list(NETWORKS) == ["unet", "multires_unet", "mlp"]
    assert all(issubclass(cls, nets.Network) for cls in NETWORKS.values())
    assert {name: cls.input_rank for name, cls in NETWORKS.items()} == {"unet": 4, "multires_unet": 4, "mlp": 2}
    with pytest.raises(ValueError, match="unknown network 'resnet'; valid names: unet, multires_unet, mlp$"):
        build("resnet", NetworkContext((2,)), rngs=nnx.Rngs(0))
    net = build("mlp", NetworkContext((3,)), hidden=8, depth=1, rngs=nnx.Rngs(0))
    assert isinstance(net, MLP) and net.in_channels == 3


def test_scoreunet_is_a_deprecated_alias_of_unet():
    """0.2's ``ScoreUNet`` still imports, for one release: the same class (so the same parameter tree), with one
    DeprecationWarning per access naming ``UNet``; it is not among the public names."""
    import warnings

    from vdm.nets import unet as unet_module
    for module, where in ((nets, "vdm.nets"), (unet_module, "vdm.nets.unet")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert module.ScoreUNet is UNet
        assert [(w.category, str(w.message)) for w in caught] == [
            (DeprecationWarning, f"{where}.ScoreUNet is deprecated: use {where}.UNet (the same class)")]
    assert "ScoreUNet" not in nets.__all__ and "UNet" in nets.__all__
    with pytest.raises(AttributeError, match="has no attribute 'ScoreNet'"):
        nets.ScoreNet  # noqa: B018


class _Flat(nets.Network):
    input_rank = 2

    def __init__(self, context, *, rngs):
        self.dense = nnx.Linear(context.in_channels(2), context.in_channels(2), rngs=rngs)

    def __call__(self, z, gamma, cond=None, *, dropout_rng=None):
        return self.dense(z)


class _NoRank(nets.Network):
    def __init__(self, context, *, rngs):
        pass

    def __call__(self, z, gamma, cond=None, *, dropout_rng=None):
        return z


class _NoCall(nets.Network):
    input_rank = 2

    def __init__(self, context, *, rngs):
        pass


class _NoContext(_Flat):
    def __init__(self, in_channels, *, rngs):
        pass


class _NoDropoutKey(_Flat):
    def __call__(self, z, gamma, cond=None):
        return z


class _Plain(nnx.Module):
    input_rank = 2

    def __init__(self, context, *, rngs):
        pass

    def __call__(self, z, gamma, cond=None, *, dropout_rng=None):
        return z


class _Volume(_Flat):
    input_rank = 3


@pytest.mark.parametrize("piece, problem", [
    (_Plain, "<class 'test_nets._Plain'> is not a subclass of vdm.nets.Network"),
    (MLP.__call__, "<function MLP.__call__ at .*> is not a subclass of vdm.nets.Network"),
    (_NoRank, "_NoRank does not declare input_rank"),
    (_Volume, r"_Volume.input_rank=3: must be 4 \(images\) or 2 \(vectors\)"),
    (_NoCall, "_NoCall does not define __call__"),
    (_NoContext, r"_NoContext.__init__ does not take 'context' \(Net\(context, \*, ..., rngs\)\)"),
    (_NoDropoutKey, r"_NoDropoutKey.__call__ does not take \(z, gamma, cond=None, \*, dropout_rng=None\)"),
])
def test_a_piece_without_the_contract_is_refused_and_nothing_is_added(piece, problem):
    before = dict(NETWORKS)
    with pytest.raises(registry.RegistrationError, match=f"^network 'broken' does not meet the network contract: "
                                                         f"{problem}"):
        nets.register("broken")(piece)
    assert dict(NETWORKS) == before and "broken" not in NETWORKS


def test_a_taken_name_or_a_bad_example_is_refused():
    with pytest.raises(registry.RegistrationError, match=r"^network 'mlp' is already registered \(by vdm.nets.mlp\)"):
        nets.register("mlp")(_Flat)
    with pytest.raises(registry.RegistrationError, match="^network 'flat': example=.*must be a vdm.nets.Example, a dict "
                                                         "with keys among kwargs, shape, or None$"):
        nets.register("flat", example={"width": 8})(_Flat)
    assert NETWORKS["mlp"] is MLP and "flat" not in NETWORKS


# ---------------------------------------------------------------------------
# Broken networks fail the check they break (the tiny MLP: a few compilations each).
# ---------------------------------------------------------------------------

TINY = nets.Example({"hidden": 8, "depth": 1, "dropout": 0.2})


class _WrongShape(MLP):
    def __call__(self, z, gamma, cond=None, *, dropout_rng=None):
        return super().__call__(z, gamma, cond, dropout_rng=dropout_rng)[:, :1]


class _NotZero(MLP):
    def __call__(self, z, gamma, cond=None, *, dropout_rng=None):
        return super().__call__(z, gamma, cond, dropout_rng=dropout_rng) + 1.0


class _DropoutAlways(MLP):
    def __call__(self, z, gamma, cond=None, *, dropout_rng=None):
        key = jax.random.key(0) if dropout_rng is None else dropout_rng
        return super().__call__(z, gamma, cond, dropout_rng=key)


class _Images(MLP):
    input_rank = 4  # declares images, takes vectors


@pytest.mark.parametrize("piece, check", [
    (_WrongShape, r"output shape and dtype: output \(2, 1\) for z \(2, 2\)"),
    (_NotZero, r"zero at initialisation: max \|out\| = 1.0"),
    (_Images, r"input rank: ValueError: expected z of shape \[B, 1\], got \(2, 8, 8, 1\)"),
    (_DropoutAlways, "dropout only with a key: without a key, dropout is on"),
])
def test_a_broken_network_fails_the_check_it_breaks(piece, check):
    with pytest.raises(AssertionError, match=f"^network 'broken' fails {check}"):
        testing.check("network", piece, name="broken", example=TINY)
