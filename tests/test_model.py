"""The model's objective, conditioning and guidance, against independent computations."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vdm import configlib, data, diffusion, evaluation, nets, options, schedules, train, weightings
from vdm import model as model_lib
from vdm import objective as objective_lib

SHAPE, VOCAB = (8, 8, 1), 17


def _model(num_classes=0, seed=0, **kw):
    kw = {"schedule": "monotone_net", "network": "mlp", "gamma_min": -10.0, "gamma_max": 5.0,
          "schedule_kwargs": {"hidden": 16}, "network_kwargs": {"hidden": 32, "depth": 1}} | kw
    return model_lib.VDM(image_shape=SHAPE, vocab_size=VOCAB, num_classes=num_classes, rngs=nnx.Rngs(seed), **kw)


def _perturbed(model, seed=3, scale=0.05):
    """The model with noise on every parameter, so that the zero-initialised output layers are active."""
    graphdef, params = nnx.split(model, nnx.Param)
    leaves, tree = jax.tree.flatten(nnx.to_pure_dict(params))
    rng = np.random.default_rng(seed)
    leaves = [x + scale * rng.standard_normal(x.shape).astype(np.float32) for x in map(np.asarray, leaves)]
    return graphdef, jax.tree.unflatten(tree, [jnp.asarray(x) for x in leaves])


def _batch(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": jnp.asarray(rng.integers(0, VOCAB, (n,) + SHAPE), jnp.uint8),
            "label": jnp.asarray(rng.integers(0, 10, n), jnp.int32)}


def _flat(tree):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_elbo_loss_is_the_mean_vlb_and_the_terms_add_up():
    graphdef, params = _perturbed(_model())
    batch, rng = _batch(), jax.random.PRNGKey(0)
    loss, _, est = objective_lib.loss_and_grads(graphdef, params, batch, rng, objective_lib.Objective())
    assert tuple(est.nats) == objective_lib.TERMS == ("prior", "reconstruction", "diffusion")
    vlb = sum(est.nats.values())
    assert float(loss) == pytest.approx(float(jnp.mean(vlb)) / (np.prod(SHAPE) * np.log(2)), rel=1e-6)
    # The one road: the bound the objective reports is diffusion.bound's for the same draw.
    d = objective_lib.draw_for_step(rng, 16, objective_lib.Objective())
    m = nnx.merge(graphdef, params)
    direct = diffusion.bound(diffusion.Draw(d.u, d.eps, d.reconstruction), batch["image"], m.schedule,
                             m.denoiser(d.dropout), vocab_size=VOCAB)
    for name in objective_lib.TERMS:  # eager vs traced: float32 rounding only
        np.testing.assert_allclose(np.asarray(est.nats[name]), np.asarray(getattr(direct, name)), rtol=1e-6,
                                   err_msg=name)
    # A weighted objective draws the same noise: same times, same noise, the same bound; only the trained
    # diffusion term is weighted, by w(lambda_t) for a per-example noise level.
    sigmoid = objective_lib.Objective(weighting=weightings.build("sigmoid"))
    loss_w, _, est_w = objective_lib.loss_and_grads(graphdef, params, batch, rng, sigmoid)
    for name in objective_lib.TERMS:
        np.testing.assert_array_equal(np.asarray(est_w.nats[name]), np.asarray(est.nats[name]), err_msg=name)
    weighted = objective_lib.estimate(m, batch, d, sigmoid)
    np.testing.assert_allclose(np.asarray(weighted.weighted),
                               np.asarray(weightings.build("sigmoid")(weighted.logsnr) * weighted.diffusion), rtol=2e-5)
    assert float(loss_w) == pytest.approx(float(jnp.mean(weighted.loss)) / (np.prod(SHAPE) * np.log(2)), rel=1e-6)
    assert float(loss_w) < float(loss)  # w < 1 everywhere: the weighted loss is below the bound


def test_variance_gradient_uses_the_same_noise_and_changes_only_the_schedule_interior():
    """The App. I.2 branch: same draw as the plain loss; the interior gets d mean(L_diffusion^2) (bits/dim), computed here
    directly by differentiating through the whole model; every other parameter keeps the loss gradient."""
    model = _model(schedule_kwargs={"hidden": 16, "learn_endpoints": True})
    graphdef, params = _perturbed(model)
    batch, rng = _batch(), jax.random.PRNGKey(1)
    plain = objective_lib.Objective()
    varied = objective_lib.Objective(variance_schedule_grad=True)
    loss_p, grads_p, est_p = objective_lib.loss_and_grads(graphdef, params, batch, rng, plain)
    loss_v, grads_v, est_v = objective_lib.loss_and_grads(graphdef, params, batch, rng, varied)
    assert float(loss_v) == pytest.approx(float(loss_p), rel=1e-5)
    np.testing.assert_allclose(np.asarray(est_v.nats["diffusion"]), np.asarray(est_p.nats["diffusion"]), rtol=1e-4)

    def second_moment(params):
        m = nnx.merge(graphdef, params)
        d = objective_lib.draw_for_step(rng, 16, plain)
        bpd = diffusion.bits_per_dim(objective_lib.estimate(m, batch, d, plain).diffusion, m.num_dims)
        return jnp.mean(bpd**2)

    direct = _flat(jax.grad(second_moment)(params))
    flat_p, flat_v = _flat(grads_p), _flat(grads_v)
    interior = {k for k in flat_v if "'schedule'" in k and "'endpoints'" not in k}
    assert interior == {f"['schedule']['{n}']" for n in ("slope", "w2", "b2", "w3")}
    for key in flat_v:
        expected = direct[key] if key in interior else flat_p[key]
        scale = np.abs(expected).max() + 1e-12
        np.testing.assert_allclose(flat_v[key], expected, rtol=1e-3, atol=1e-4 * scale, err_msg=key)
    assert not np.allclose(flat_v["['schedule']['w3']"], flat_p["['schedule']['w3']"])


def test_a_swapped_schedule_keeps_the_expected_bound_and_changes_only_its_variance():
    """``objective.estimate(schedule=...)`` (VDM Sec. 5.1): the network sees gamma_t, never t, so for given images
    and noise eps the expectation over t of the diffusion term is the integral over gamma from gamma_0 to gamma_1
    of 0.5 ||eps - eps_hat(z_gamma, gamma)||^2, under every schedule with those endpoints; here against that
    integral by the trapezoid rule, with the prior and reconstruction terms unchanged."""
    graphdef, params = _perturbed(_model(schedule_kwargs={"hidden": 16, "learn_endpoints": True}))
    model, batch, objective = nnx.merge(graphdef, params), _batch(8), objective_lib.EVALUATION
    g0, g1 = (float(g) for g in model.schedule.endpoints())
    d = objective_lib.draw_for_step(jax.random.PRNGKey(4), 8, objective)
    own = objective_lib.estimate(model, batch, d, objective, train=False)
    explicit = objective_lib.estimate(model, batch, d, objective, train=False, schedule=model.schedule)
    for a, b in zip(own, explicit):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    f = diffusion.encode(batch["image"], VOCAB)
    eps = jax.random.normal(d.eps, f.shape)
    grid = np.linspace(g0, g1, 4001)
    integrand = jax.jit(jax.vmap(lambda g: 0.5 * jnp.sum(jnp.square(
        eps - model.eps(diffusion.diffuse(f, jnp.full((8,), g), eps), jnp.full((8,), g))), axis=(1, 2, 3))))
    exact = np.trapezoid(np.asarray(integrand(jnp.asarray(grid, jnp.float32)), np.float64), grid, axis=0)

    u = jax.random.uniform(jax.random.PRNGKey(5), (4096, 8))
    variances = {}
    for name in ("learned", "fixed_linear", "cosine"):
        def estimate(params, u, name=name):
            m = nnx.merge(graphdef, params)
            schedule = None if name == "learned" else schedules.build(name, gamma_min=g0, gamma_max=g1)
            terms = objective_lib.estimate(m, batch, d._replace(u=u), objective, train=False, schedule=schedule)
            return terms.diffusion, terms.prior, terms.reconstruction

        diff, prior, reconstruction = jax.jit(jax.vmap(estimate, in_axes=(None, 0)))(params, u)
        diff = np.asarray(diff, np.float64)
        se = diff.std(axis=0, ddof=1) / np.sqrt(len(u))
        assert np.all(np.abs(diff.mean(axis=0) - exact) < 4 * se), (name, diff.mean(axis=0), exact, se)
        np.testing.assert_allclose(np.asarray(prior[0]), np.asarray(own.prior), rtol=1e-6)
        # ~0 nats at gamma_0 (the decoder is near certain): float32 rounding of a fused log-sum-exp differs
        np.testing.assert_allclose(np.asarray(reconstruction[0]), np.asarray(own.reconstruction), rtol=1e-6, atol=1e-4)
        variances[name] = diff.var(axis=0).mean()
    assert variances["cosine"] > 2 * variances["fixed_linear"]


def test_the_ode_likelihood_differentiates_a_convolutional_network_through_its_custom_convolutions():
    """ode_nll takes the network's jvp (the divergence) with whatever convolution derivatives the network
    was built with, knowing nothing of them: here the custom ones (stride 1 and 2) trace in forward mode.
    That this jvp equals XLA's own: tests/test_nets.py; traced, not compiled, to stay quick."""
    kw = dict(network="multires_unet", network_kwargs={"channels": 8, "channel_mult": (1, 2), "num_res_blocks": 1,
                                                       "mid_attention": False, "with_fourier_features": False})
    graphdef, state = nnx.split(nnx.eval_shape(lambda: _model(convolution_gradient="custom", **kw)))
    nll = jax.make_jaxpr(lambda state, b: evaluation.ode_nll(nnx.merge(graphdef, state), b, jax.random.PRNGKey(1)))(
        state, _batch(4))
    assert "custom_jvp_call" in str(nll) and str(nll).count("conv_general_dilated") >= 2 * 15
    assert nll.out_avals[0].shape == (4,)


def test_label_dropout_one_is_the_unconditional_model():
    """With every label dropped to the null class (whose embedding is zero here), a conditional model
    computes exactly the unconditional model's loss and gradients, whatever the labels."""
    graphdef_u, params_u = _perturbed(_model())
    graphdef_c, params_c = nnx.split(_model(num_classes=10), nnx.Param)
    params_c = nnx.to_pure_dict(params_c)
    table = np.asarray(params_c["network"]["conditioning"]["label_embedding"]["embedding"]).copy()
    table[10] = 0.0  # the null class's row
    params_c = jax.tree.map(lambda x: x, params_u)
    params_c["network"]["conditioning"]["label_embedding"] = {"embedding": jnp.asarray(table)}
    dropped = objective_lib.Objective(label_dropout=1.0)
    rng = jax.random.PRNGKey(2)
    loss_u, grads_u, est_u = objective_lib.loss_and_grads(graphdef_u, params_u, _batch(), rng, objective_lib.Objective())
    for labels_seed in (0, 1):
        loss_c, grads_c, est_c = objective_lib.loss_and_grads(graphdef_c, params_c, _batch(seed=labels_seed) | {
            "image": _batch()["image"]}, rng, dropped)
        assert float(loss_c) == pytest.approx(float(loss_u), rel=1e-6)
        np.testing.assert_allclose(np.asarray(sum(est_c.nats.values())), np.asarray(sum(est_u.nats.values())),
                                   rtol=1e-5)
        flat_c, flat_u = _flat(grads_c), _flat(grads_u)
        for key, g in flat_u.items():
            np.testing.assert_allclose(flat_c[key], g, rtol=1e-4, atol=1e-7, err_msg=key)
        embedding_grad = flat_c["['network']['conditioning']['label_embedding']['embedding']"]
        assert np.all(embedding_grad[:10] == 0) and np.any(embedding_grad[10] != 0)


def test_label_dropout_replaces_that_fraction_of_labels_by_the_null_class():
    model = _model(num_classes=10)
    labels = jnp.arange(4000) % 10
    cond = model.condition({"image": None, "label": labels}, jax.random.PRNGKey(0), 0.25)
    dropped = np.asarray(cond["label"]) == 10
    kept = ~dropped
    assert abs(dropped.mean() - 0.25) < 4 * np.sqrt(0.25 * 0.75 / 4000)
    np.testing.assert_array_equal(np.asarray(cond["label"])[kept], np.asarray(labels)[kept])
    assert model.condition({"image": None, "label": labels}) is not None
    assert _model().condition({"image": None, "label": labels}) is None  # unconditional: labels are ignored
    with pytest.raises(ValueError, match="needs batches with labels"):
        model.condition({"image": None})


def test_guidance_is_the_weighted_difference_of_two_network_calls():
    graphdef, params = _perturbed(_model(num_classes=10))
    model = nnx.merge(graphdef, params)
    z = jax.random.normal(jax.random.PRNGKey(0), (6,) + SHAPE)
    gamma = jnp.linspace(-8.0, 4.0, 6)
    cond = {"label": jnp.array([0, 1, 2, 3, 4, 5])}
    conditional = model.eps(z, gamma, cond)
    unconditional = model.eps(z, gamma, None)
    assert np.abs(np.asarray(conditional - unconditional)).max() > 1e-4
    for w in (0.5, 3.0):
        np.testing.assert_allclose(np.asarray(model.eps(z, gamma, cond, guidance=w)),
                                   np.asarray((1 + w) * conditional - w * unconditional), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(model.eps(z, gamma, cond, guidance=0.0)), np.asarray(conditional))
    # A traced weight (one compiled function for a sweep of weights) takes the guided form at every w, 0 included.
    traced = jax.jit(lambda w: model.eps(z, gamma, cond, guidance=w))
    for w in (0.0, 0.5, 3.0):
        np.testing.assert_allclose(np.asarray(traced(jnp.float32(w))),
                                   np.asarray((1 + w) * conditional - w * unconditional), rtol=1e-4, atol=1e-5)


def test_spread_labels():
    np.testing.assert_array_equal(np.asarray(model_lib.spread_labels(12, 5)), [0, 1, 2, 3, 4] * 2 + [0, 1])
    np.testing.assert_array_equal(np.asarray(model_lib.spread_labels(5, 10, (7, 2))), [7, 2, 7, 2, 7])
    with pytest.raises(ValueError, match="0..9"):
        model_lib.spread_labels(4, 10, (10,))
    np.testing.assert_array_equal(np.asarray(model_lib.spread_labels(3, 10, np.array([4, 1]))), [4, 1, 4])
    np.testing.assert_array_equal(np.asarray(model_lib.spread_labels(3, 10, jnp.array([4, 1]))), [4, 1, 4])
    for labels in [(10,), (-1,), (2.0,), ("abc",), (True,), 3]:
        with pytest.raises(options.OptionError) as info:
            model_lib.spread_labels(4, 10, labels)
        assert str(info.value) == f"labels={labels!r}: must be class indices, integers in 0..9"
    with pytest.raises(options.OptionError, match=r"^labels=\(\): needs a class-conditional model \(num_classes > 0\)$"):
        model_lib.spread_labels(4, 0)
    assert model_lib.check_labels((np.int64(3), 1), 10) == (3, 1)


def test_the_arguments_vdm_passes_its_pieces_are_declared_once(monkeypatch):
    """VDM gives the schedule exactly ScheduleArguments and the network exactly NetworkArguments
    (besides their kwargs): configlib reads those declarations to know what the kwargs cannot set."""
    given = {}

    def recorder(kind, piece):
        def build(*args, **kwargs):
            given[kind] = set(kwargs)
            return piece(*args, **kwargs)
        return build

    monkeypatch.setattr(schedules, "build", recorder("schedule", schedules.build))

    class Recording(nets.NETWORKS["mlp"]):
        def __init__(self, **kwargs):
            given["network"] = set(kwargs)
            super().__init__(**kwargs)

    monkeypatch.setattr(nets, "lookup", lambda name: Recording)  # the registry itself is append-only
    _model()
    assert given["schedule"] == set(model_lib.ScheduleArguments._fields) | {"hidden"}
    assert given["network"] == set(model_lib.NetworkArguments._fields) | {"hidden", "depth"}
    pieces = {piece.kind: piece.set_by_vdm for piece in configlib.PIECES}
    assert pieces["schedule"] == model_lib.ScheduleArguments._fields
    assert pieces["network"] == model_lib.NetworkArguments._fields


def _pixels(source):
    records = data.read_rows(source, np.arange(len(source)))
    return records["image"].reshape(len(source), -1) / (source.vocab_size - 1), records["label"]


@pytest.mark.xdist_group("digits_cond")
def test_the_digits_cond_group_reaches_pytest_xdist(request):
    """Under `make test` (pytest-xdist, --dist loadgroup) the tests sharing the trained model must
    run on one worker, else each worker trains it again (about a minute each)."""
    if not request.config.getoption("loadgroup", False):
        pytest.skip("not run by pytest-xdist with --dist loadgroup")
    assert request.node.nodeid.endswith("@digits_cond"), (
        "pytest-xdist did not tag this test with its xdist_group: the grouping is lost (pytest 9.2 "
        "with pytest-xdist 3.8 does this; see the pin in pyproject.toml)")


@pytest.mark.slow
@pytest.mark.xdist_group("digits_cond")
def test_class_conditional_samples_are_of_the_requested_class_and_guidance_sharpens_them(digits_cond):
    """A conditional model trained briefly on the 8x8 digits: an independent classifier (logistic
    regression fitted here on the training digits) recognises the requested class of its samples far
    above chance (10%), and more often with classifier-free guidance."""
    from sklearn.linear_model import LogisticRegression

    config, workdir, result = digits_cond
    with np.load(os.path.join(workdir, "samples_300.npz")) as saved:
        np.testing.assert_array_equal(saved["labels"], np.arange(10))  # the default: an even spread
        assert saved["images"].shape == (10, 8, 8, 1)
    assert np.isfinite(result["bpd"])

    trainer = train.Trainer(config, workdir)
    trainer.restore_latest()
    x, y = _pixels(trainer.dataset.train)
    classifier = LogisticRegression(max_iter=2000).fit(x, y)
    x_test, y_test = _pixels(trainer.dataset.test)
    assert classifier.score(x_test, y_test) > 0.9  # the judge itself is reliable

    n = 100
    labels = np.arange(n) % 10
    accuracy = {}
    # One compiled sampler for every w, at XLA's default optimisation level (the suite's, 0, runs it 3x slower).
    fn = jax.jit(lambda p, r, w: model_lib.generate(nnx.merge(trainer.graphdef, p), r, n, num_steps=64,
                                                    labels=labels, guidance=w),
                 compiler_options={"xla_backend_optimization_level": 2})
    for guidance in (0.0, 3.0):
        images = np.asarray(fn(trainer.state.ema_params, jax.random.PRNGKey(1), jnp.float32(guidance)).images)
        accuracy[guidance] = float(np.mean(classifier.predict(images.reshape(n, -1) / 16.0) == labels))
    print(f"\n[conditional digits, 300 steps] classifier accuracy on samples: w=0 {accuracy[0.0]:.2f}, "
          f"w=3 {accuracy[3.0]:.2f} (chance 0.10)")
    # Chance is 0.1 with a binomial SE of 0.03 for 100 samples: 0.3 is far above it (measured at 300 steps,
    # three seeds: 0.48 to 0.62 unguided, 0.98 to 1.0 at w = 3).
    assert accuracy[0.0] > 0.3
    assert accuracy[3.0] > accuracy[0.0] + 0.1


@pytest.mark.slow
@pytest.mark.xdist_group("digits_cond")
def test_bfloat16_compute_moves_a_trained_models_vlb_by_less_than_its_standard_error(digits_cond):
    """config.model.dtype = bfloat16 (float32 parameters, float32 loss) evaluates the trained model's
    test VLB within the float32 estimate's own standard error, and within 0.01 bits/dim per digit on
    average (same digits, same randomness)."""
    config, workdir, _ = digits_cond
    results = {}
    for dtype in ("float32", "bfloat16"):
        c = config.copy_and_resolve_references()
        c.model.dtype = dtype
        c.eval.num_examples = 0  # every test digit
        trainer = train.Trainer(c, workdir)
        trainer.restore_latest()
        results[dtype] = trainer.evaluate(per_example=True)
        trainer.close()
    f32, bf16 = results["float32"], results["bfloat16"]
    diff = bf16["per_example"]["bpd"] - f32["per_example"]["bpd"]
    print(f"\n[bfloat16] test bpd {bf16['bpd']:.4f} vs float32 {f32['bpd']:.4f} +- {f32['bpd_se']:.4f}; "
          f"paired difference {diff.mean():+.4f} +- {diff.std(ddof=1) / np.sqrt(len(diff)):.4f}")
    assert bf16["count"] == f32["count"] == len(diff) > 100
    assert abs(bf16["bpd"] - f32["bpd"]) < f32["bpd_se"]
    # Tighter, on the paired difference (its standard error is ~1e-3 here): bfloat16 rounding of the
    # network's activations, not a lower-precision loss, is all that changes.
    assert abs(diff.mean()) < 0.01
