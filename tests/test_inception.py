"""FID's InceptionV3 (vdm.inception) on a random network: published sizes, torch's conventions
re-derived in numpy, the state-dict round trip, the errors, and FID through Trainer.sample.

The real weights cannot be downloaded here, so nothing checks the features against
pytorch-fid's numbers; what is checked is every convention that those numbers depend on.
"""
import glob
import hashlib
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config, run_python
from flax import nnx

from vdm import compilation, configlib, data, inception, main, quality, train

BATCH = 2  # one compiled network for the whole file: every call uses this batch size


def random_state_dict(seed: int) -> dict[str, np.ndarray]:
    """pytorch-fid's state-dict names and shapes with random values: He-scaled kernels (activations keep their
    scale through the ~50 ReLU layers), BatchNorm statistics and affine terms away from the identity."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in inception.expected_shapes().items():
        if name.endswith("conv.weight"):
            out[name] = rng.normal(0.0, math.sqrt(2.0 / math.prod(shape[1:])), shape)
        elif name.endswith(("running_var", "bn.weight")):
            out[name] = rng.uniform(0.5, 1.5, shape)
        else:
            out[name] = rng.normal(0.0, 0.1, shape)
    return {k: v.astype(np.float32) for k, v in out.items()}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """(path of an .npz like the converted real file, its state dict). The file also holds names the
    network does not use, as pytorch-fid's does (the classifier, BatchNorm's step counters)."""
    state_dict = random_state_dict(0)
    path = str(tmp_path_factory.mktemp("inception") / "random_inception.npz")
    np.savez(path, **state_dict, **{"fc.weight": np.zeros((1008, 2048), np.float32), "fc.bias": np.zeros(1008, np.float32),
                                    "Conv2d_1a_3x3.bn.num_batches_tracked": np.int64(0)})
    return path, state_dict


@pytest.fixture(scope="module")
def net(weights):
    return inception.from_state_dict(weights[1])


def images(seed: int, n: int, shape=(16, 16, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


# --------------------------------------------------------------------------------------
# The architecture, against published figures and torch's conventions
# --------------------------------------------------------------------------------------


def test_parameter_count_and_names_are_those_of_the_published_network():
    shapes = inception.expected_shapes()
    kernels = sum(math.prod(s) for k, s in shapes.items() if k.endswith("conv.weight"))
    channels = sum(math.prod(s) for k, s in shapes.items() if k.endswith("bn.bias"))  # BatchNorm channels
    # torchvision's Inception_V3_Weights.IMAGENET1K_V1.meta["num_params"] = 27,161,264 (kernels, BatchNorm weight and
    # bias, AuxLogits, fc); pytorch-fid's FID blocks only change the forward pass. Less AuxLogits (1x1 conv 768->128 +
    # BatchNorm, 5x5 conv 128->768 + BatchNorm, fc 768->1000) and the classifier fc 2048->1000:
    aux = 768 * 128 + 2 * 128 + 128 * 768 * 25 + 2 * 768 + 768 * 1000 + 1000
    assert kernels + 2 * channels == 27_161_264 - aux - (2048 * 1000 + 1000) == 21_785_568
    # Keras' InceptionV3(include_top=False).count_params() = 21,802,784: kernels, BatchNorm beta (no gamma), moving
    # mean and variance. The two published figures fix both sums:
    assert kernels + 3 * channels == 21_802_784
    assert sum(k.endswith("conv.weight") for k in shapes) == 94 and len(shapes) == 5 * 94
    abstract = nnx.state(nnx.eval_shape(lambda: inception.FIDInceptionV3(rngs=nnx.Rngs(0))))
    assert sum(math.prod(v.shape) for v in jax.tree_util.tree_leaves(abstract)) == kernels + 4 * channels
    # Names and torch shapes (out, in, kh, kw) as torchvision's inception.py builds them:
    assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert shapes["Mixed_5b.branch_pool.conv.weight"] == (32, 192, 1, 1)  # pool_features=32
    assert shapes["Mixed_6b.branch7x7_2.conv.weight"] == (128, 128, 1, 7)  # channels_7x7=128
    assert shapes["Mixed_6e.branch7x7dbl_2.conv.weight"] == (192, 192, 7, 1)
    assert shapes["Mixed_7c.branch3x3dbl_3b.conv.weight"] == (384, 384, 3, 1)
    assert shapes["Mixed_7c.branch_pool.bn.running_var"] == (192,)


def test_block_sizes_follow_torchvision_for_299_and_the_75_pixel_minimum():
    graphdef, state = nnx.split(nnx.eval_shape(lambda: inception.FIDInceptionV3(rngs=nnx.Rngs(0))))

    def sizes(side):
        x = jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32)
        return [b.shape[1:] for b in jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).blocks(x), state, x)]

    # torchvision's comments: 64 x 73 x 73, 192 x 35 x 35, 768 x 17 x 17, 2048 x 8 x 8.
    assert sizes(299) == [(73, 73, 64), (35, 35, 192), (17, 17, 768), (8, 8, 2048)]
    assert sizes(75)[-1] == (1, 1, 2048)  # torchvision: "The required minimum input size of the model is 75x75"
    x = jax.ShapeDtypeStruct((3, 299, 299, 3), jnp.float32)
    assert jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, x).shape == (3, inception.FEATURES)


def conv2d(x, w, stride=1, padding=(0, 0)):
    """torch's conv2d: x NCHW, w OIHW (out, in, kh, kw), zero padding (rows, columns) on both sides."""
    x = np.pad(x, ((0, 0), (0, 0), (padding[0], padding[0]), (padding[1], padding[1])))
    windows = np.lib.stride_tricks.sliding_window_view(x, w.shape[2:], axis=(2, 3))[:, :, ::stride, ::stride]
    return np.einsum("ncyxij,ocij->noyx", windows, w, optimize=True)


def pool(x, kind: str, stride: int = 1, padding: int = 0):
    """3 x 3 max_pool2d, or avg_pool2d with count_include_pad=False (the mean over the pixels inside), NCHW."""
    fill = -np.inf if kind == "max" else np.nan
    windows = np.lib.stride_tricks.sliding_window_view(
        np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)), constant_values=fill), (3, 3), axis=(2, 3))
    return (np.max if kind == "max" else np.nanmean)(windows[:, :, ::stride, ::stride], axis=(-2, -1))


def test_the_fid_pools_leave_the_padding_out():
    x = np.random.default_rng(0).normal(size=(2, 5, 6, 3)).astype(np.float32)
    nchw = x.transpose(0, 3, 1, 2).astype(np.float64)
    # FIDInceptionA/C/E_1: avg_pool2d(3, stride 1, padding 1, count_include_pad=False); at a corner, 4 pixels.
    np.testing.assert_allclose(inception.avg_pool_valid(x), pool(nchw, "avg", padding=1).transpose(0, 2, 3, 1),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(inception.avg_pool_valid(x)[:, 0, 0], x[:, :2, :2].mean(axis=(1, 2)), rtol=1e-6)
    # FIDInceptionE_2: max_pool2d(3, stride 1, padding 1); the stem and Mixed_6a / 7a: max_pool2d(3, stride 2).
    np.testing.assert_array_equal(inception.max_pool(x, 1, padding=1), pool(nchw, "max", 1, 1).transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(inception.max_pool(x, 2), pool(nchw, "max", 2).transpose(0, 2, 3, 1))


class TorchReference:
    """pytorch-fid's FID InceptionV3 in numpy (NCHW, float64), written from torchvision's inception.py (layers,
    kernel sizes, strides, paddings, concatenation order) and pytorch-fid's inception.py (the FID blocks)."""

    def __init__(self, state_dict):
        self.sd = {k: v.astype(np.float64) for k, v in state_dict.items()}

    def conv(self, name, x, stride=1, padding=(0, 0)):  # BasicConv2d: conv, BatchNorm(eps=0.001) in eval mode, relu
        sd, c = self.sd, (slice(None), None, None)
        y = conv2d(x, sd[f"{name}.conv.weight"], stride, padding)
        y = (y - sd[f"{name}.bn.running_mean"][c]) / np.sqrt(sd[f"{name}.bn.running_var"][c] + 1e-3)
        return np.maximum(y * sd[f"{name}.bn.weight"][c] + sd[f"{name}.bn.bias"][c], 0.0)

    def a(self, m, x):  # FIDInceptionA
        c = lambda name, x, p=(0, 0): self.conv(f"{m}.{name}", x, padding=p)  # noqa: E731
        return np.concatenate([
            c("branch1x1", x), c("branch5x5_2", c("branch5x5_1", x), (2, 2)),
            c("branch3x3dbl_3", c("branch3x3dbl_2", c("branch3x3dbl_1", x), (1, 1)), (1, 1)),
            c("branch_pool", pool(x, "avg", padding=1))], axis=1)

    def b(self, m, x):  # InceptionB
        return np.concatenate([
            self.conv(f"{m}.branch3x3", x, 2),
            self.conv(f"{m}.branch3x3dbl_3", self.conv(f"{m}.branch3x3dbl_2", self.conv(f"{m}.branch3x3dbl_1", x),
                                                       padding=(1, 1)), 2),
            pool(x, "max", 2)], axis=1)

    def c(self, m, x):  # FIDInceptionC
        c = lambda name, x, p=(0, 0): self.conv(f"{m}.{name}", x, padding=p)  # noqa: E731
        b7 = c("branch7x7_3", c("branch7x7_2", c("branch7x7_1", x), (0, 3)), (3, 0))
        d7 = c("branch7x7dbl_1", x)
        for i, p in ((2, (3, 0)), (3, (0, 3)), (4, (3, 0)), (5, (0, 3))):
            d7 = c(f"branch7x7dbl_{i}", d7, p)
        return np.concatenate([c("branch1x1", x), b7, d7, c("branch_pool", pool(x, "avg", padding=1))], axis=1)

    def d(self, m, x):  # InceptionD
        c = lambda name, x, p=(0, 0), s=1: self.conv(f"{m}.{name}", x, s, p)  # noqa: E731
        b3 = c("branch3x3_2", c("branch3x3_1", x), s=2)
        b7 = c("branch7x7x3_4", c("branch7x7x3_3", c("branch7x7x3_2", c("branch7x7x3_1", x), (0, 3)), (3, 0)), s=2)
        return np.concatenate([b3, b7, pool(x, "max", 2)], axis=1)

    def e(self, m, x, pool_kind):  # FIDInceptionE_1 (avg, count_include_pad=False) and FIDInceptionE_2 (max)
        c = lambda name, x, p=(0, 0): self.conv(f"{m}.{name}", x, padding=p)  # noqa: E731
        b3 = c("branch3x3_1", x)
        d3 = c("branch3x3dbl_2", c("branch3x3dbl_1", x), (1, 1))
        return np.concatenate([c("branch1x1", x), c("branch3x3_2a", b3, (0, 1)), c("branch3x3_2b", b3, (1, 0)),
                               c("branch3x3dbl_3a", d3, (0, 1)), c("branch3x3dbl_3b", d3, (1, 0)),
                               c("branch_pool", pool(x, pool_kind, padding=1))], axis=1)

    def __call__(self, x):  # x NCHW in [-1, 1] -> pool3 [N, 2048]
        x = self.conv("Conv2d_2b_3x3", self.conv("Conv2d_2a_3x3", self.conv("Conv2d_1a_3x3", x, 2)), padding=(1, 1))
        x = pool(self.conv("Conv2d_4a_3x3", self.conv("Conv2d_3b_1x1", pool(x, "max", 2))), "max", 2)
        for m in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
            x = self.a(m, x)
        x = self.b("Mixed_6a", x)
        for m in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
            x = self.c(m, x)
        x = self.e("Mixed_7c", self.e("Mixed_7b", self.d("Mixed_7a", x), "avg"), "max")
        return x.mean(axis=(2, 3))


def test_the_network_computes_pytorch_fids_graph(net, weights):
    """The whole network at torchvision's minimum size 75 x 75 (no resize), against the numpy reference: kernels'
    layout, paddings, strides, the branches' order, the FID pools and pool3 all meet in this number."""
    x = np.random.default_rng(1).uniform(-1.0, 1.0, (1, 3, 75, 75))
    expected = TorchReference(weights[1])(x)
    graphdef, state = nnx.split(net)
    got = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32))
    assert expected.std() > 0.1
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # One layer on its own (1 x 7 kernel, padding (0, 3)), to point at the layout if the whole disagrees.
    h = np.random.default_rng(2).normal(size=(1, 128, 9, 9))
    np.testing.assert_allclose(net.Mixed_6b.branch7x7_2(jnp.asarray(h.transpose(0, 2, 3, 1), jnp.float32)),
                               TorchReference(weights[1]).conv("Mixed_6b.branch7x7_2", h, padding=(0, 3)).transpose(
                                   0, 2, 3, 1), rtol=1e-4, atol=1e-4)


def torch_bilinear(x: np.ndarray, side: int) -> np.ndarray:
    """F.interpolate(x, (side, side), mode="bilinear", align_corners=False) as aten's upsample_bilinear2d, NHWC."""
    def axis(n_in):
        src = np.maximum((np.arange(side) + 0.5) * n_in / side - 0.5, 0.0)
        i0 = np.floor(src).astype(int)
        return i0, np.minimum(i0 + 1, n_in - 1), (src - i0)

    h0, h1, lh = axis(x.shape[1])
    w0, w1, lw = axis(x.shape[2])
    rows = x[:, h0] * (1 - lh)[None, :, None, None] + x[:, h1] * lh[None, :, None, None]
    return rows[:, :, w0] * (1 - lw)[None, None, :, None] + rows[:, :, w1] * lw[None, None, :, None]


@pytest.mark.parametrize("shape", [(32, 32, 3), (8, 8, 1), (8, 8), (301, 400, 3), (299, 299, 3)])
def test_preprocessing_is_pytorch_fids_resize_and_scaling(shape):
    x = images(2, 2, shape)
    channels = x if x.ndim == 4 else x[..., None]
    rgb = np.repeat(channels, 3 // channels.shape[-1], axis=-1)
    expected = 2.0 * torch_bilinear(rgb.astype(np.float64) / 255.0, 299) - 1.0
    got = inception.preprocess(x)
    assert got.shape == (2, 299, 299, 3) and got.dtype == jnp.float32
    # float32 source positions (error ~1e-7 x 400 pixels) on noise images; align_corners=True, antialiasing or a
    # half-pixel shift would be off by more than 1e-2.
    np.testing.assert_allclose(got, expected, atol=1e-4)
    levels = x // 16  # 16 levels, 0..15: the same picture as levels * 17 in 0..255
    np.testing.assert_allclose(inception.preprocess(levels, max_value=15.0), inception.preprocess(levels * 17), atol=2e-6)


# --------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------


def test_state_dict_round_trip_gives_identical_arrays_and_features(net, weights, tmp_path):
    path, state_dict = weights
    back = inception.to_state_dict(net)  # the Flax tree under the state-dict names, torch layout
    assert set(back) == set(state_dict)
    for name, value in state_dict.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)
    inception.save_npz(str(tmp_path / "again.npz"), back)
    loaded = inception.load_weights(str(tmp_path / "again.npz"))
    assert loaded.sha256 == hashlib.sha256((tmp_path / "again.npz").read_bytes()).hexdigest()
    x = images(3, BATCH)
    f = inception.features(net, x, batch_size=BATCH)
    assert f.shape == (BATCH, inception.FEATURES) and np.all(np.isfinite(f)) and f.std() > 0.05
    np.testing.assert_array_equal(inception.features(loaded.network, x, batch_size=BATCH), f)
    from_file = inception.load_weights(path)  # the names the network does not use are left out
    assert set(from_file.state_dict) == set(inception.expected_shapes())


def test_features_do_not_depend_on_batching_order_dtype_or_grey_channels(net):
    x = images(4, 3)  # 3 images in batches of 2: the last batch is padded
    f = inception.features(net, x, batch_size=BATCH)
    order = [2, 0, 1]
    np.testing.assert_allclose(inception.features(net, x[order], batch_size=BATCH), f[order], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(inception.features(net, x[:1].astype(np.float32), batch_size=BATCH), f[:1], rtol=1e-5,
                               atol=1e-6)
    grey = x[:2, :, :, :1]
    np.testing.assert_allclose(inception.features(net, grey, batch_size=BATCH),
                               inception.features(net, np.repeat(grey, 3, axis=-1), batch_size=BATCH), rtol=1e-5, atol=1e-6)
    source = data.make_split(x, None, vocab_size=256, origin="test")  # a data split, read a batch at a time
    np.testing.assert_allclose(inception.features(net, source, batch_size=BATCH), f, rtol=1e-5, atol=1e-6)


def _one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_a_missing_or_unreadable_file_is_one_line_saying_what_to_download(tmp_path):
    with pytest.raises(inception.WeightsError) as error:
        inception.load_weights(str(tmp_path / "nowhere.npz"))
    message = _one_line(error)
    assert str(tmp_path / "nowhere.npz") in message and inception.URL in message
    assert "python scripts/convert_inception_weights.py pt_inception-2015-12-05-6726825d.pth" in message
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file")
    with pytest.raises(inception.WeightsError) as error:
        inception.load_weights(str(tmp_path / "garbage.npz"))
    assert "garbage.npz" in _one_line(error) and "not readable" in str(error.value)
    (tmp_path / "weights.h5").write_bytes(b"")
    with pytest.raises(inception.WeightsError) as error:
        inception.load_weights(str(tmp_path / "weights.h5"))
    assert "expected an .npz" in _one_line(error)
    (tmp_path / "weights.pth").write_bytes(b"")
    if inception.weights_problem(str(tmp_path / "weights.pth")) is not None:  # torch is not installed
        with pytest.raises(inception.WeightsError) as error:
            inception.load_weights(str(tmp_path / "weights.pth"))
        assert "needs torch" in _one_line(error) and "scripts/convert_inception_weights.py" in str(error.value)


def test_a_missing_or_misshapen_array_is_named_in_one_line(weights, tmp_path, monkeypatch):
    bad = dict(weights[1])
    bad["Mixed_6c.branch7x7_2.conv.weight"] = bad["Mixed_6c.branch7x7_2.conv.weight"].transpose(0, 1, 3, 2)  # 7x1, not 1x7
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(inception.WeightsError) as error:
        inception.load_weights(str(tmp_path / "bad.npz"))
    assert _one_line(error) == (f"{tmp_path / 'bad.npz'}: 'Mixed_6c.branch7x7_2.conv.weight' has shape (160, 160, 7, 1), "
                                "expected (160, 160, 1, 7)")
    config = load_config("test")  # found by the trainer before anything is compiled
    config.eval.inception_weights = str(tmp_path / "bad.npz")
    monkeypatch.setattr(compilation, "compile_run", lambda *a: pytest.fail("compiled despite bad weights"))
    with pytest.raises(inception.WeightsError, match="Mixed_6c.branch7x7_2.conv.weight"):
        train.Trainer(config, str(tmp_path / "run"))
    del bad["Mixed_7b.branch_pool.bn.running_var"]
    with pytest.raises(inception.WeightsError) as error:
        inception.check_state_dict(bad, "bad")
    assert "'Mixed_6c.branch7x7_2.conv.weight'" in _one_line(error)  # the first, in the network's order
    bad["Mixed_6c.branch7x7_2.conv.weight"] = weights[1]["Mixed_6c.branch7x7_2.conv.weight"]
    with pytest.raises(inception.WeightsError) as error:
        inception.check_state_dict(bad, "bad")
    assert "bad: no array 'Mixed_7b.branch_pool.bn.running_var' (of shape (192,))" in _one_line(error)


# --------------------------------------------------------------------------------------
# FID
# --------------------------------------------------------------------------------------


def test_fid_of_the_same_images_is_zero_and_small_sample_fid_is_the_frechet_distance(net):
    f = inception.features(net, images(5, 4), batch_size=BATCH)
    mu, cov = quality.gaussian_statistics(f)
    # Zero up to the square roots of the eigenvalues that are zero in exact arithmetic (sqrt(1e-16) relative).
    assert abs(quality.frechet_distance_to(f, mu, cov)) < 1e-6 * np.trace(cov)
    assert abs(quality.frechet_distance_to(f[::-1], mu, cov)) < 1e-6 * np.trace(cov)  # order does not matter
    # Synthetic Gaussian features at FID's dimension, 64 samples (rank 63): the closed form for N(m, C) against
    # N(m', k^2 C), ||m - m'||^2 + (1 - k)^2 tr C, holds for sample statistics exactly.
    x = np.random.default_rng(6).normal(size=(64, inception.FEATURES))
    y = 0.3 + 2.0 * x
    mu_y, cov_y = quality.gaussian_statistics(y)
    mu_x, cov_x = quality.gaussian_statistics(x)
    assert quality.frechet_distance_to(x, mu_y, cov_y) == pytest.approx(
        np.sum((mu_x - mu_y) ** 2) + np.trace(cov_x), rel=1e-6)
    # and agrees with frechet_distance of the statistics, with fewer and with more rows than dimensions.
    z = np.random.default_rng(7).normal(size=(300, 40)) @ np.random.default_rng(8).normal(size=(40, 40))
    ref = quality.gaussian_statistics(np.random.default_rng(9).normal(size=(500, 40)) * 1.5 + 0.2)
    for rows in (z[:12], z):
        assert quality.frechet_distance_to(rows, *ref) == pytest.approx(
            quality.frechet_distance(*quality.gaussian_statistics(rows), *ref), rel=1e-6)


def test_bad_fid_settings_are_one_line_config_errors_before_compiling(weights, tmp_path):
    config = load_config("test")
    config.eval.inception_weights = str(tmp_path / "nowhere.npz")
    with pytest.raises(configlib.ConfigError) as error:
        configlib.validate(config)
    assert _one_line(error).startswith(f"config.eval.inception_weights='{tmp_path / 'nowhere.npz'}': no such file: "
                                       f"download {inception.URL}")
    (tmp_path / "weights.txt").write_text("")
    config.eval.inception_weights = str(tmp_path / "weights.txt")
    with pytest.raises(configlib.ConfigError, match=r"expected an \.npz"):
        configlib.validate(config)
    config.eval.inception_weights = weights[0]
    configlib.validate(config)
    points = data.DatasetInfo(name="sklearn_moons", shape=(1, 1, 2), vocab_size=256, num_train=100, num_test=10,
                              num_classes=0, kind="points")
    with pytest.raises(configlib.ConfigError) as error:
        configlib.validate_against_data(config, points)
    assert _one_line(error) == (f"config.eval.inception_weights={weights[0]!r}: FID needs RGB or grayscale images, "
                                "not sklearn_moons (points of shape (1, 1, 2))")
    config.sample.num_images = 1
    with pytest.raises(configlib.ConfigError, match="FID needs at least 2 samples"):
        configlib.validate_against_data(config, data.DatasetInfo("digits", (8, 8, 1), 17, 100, 10, 10, "image"))
    assert inception.WeightsError in main.input_errors()  # a bad file found later is an `error:` line too


@pytest.mark.slow
def test_the_cli_names_the_missing_weights_in_one_error_line(tmp_path):
    run = run_python(["-m", "vdm.main", "--config", "configs/test.py", "--workdir", str(tmp_path / "run"),
                      f"--config.eval.inception_weights={tmp_path / 'pt_inception.npz'}"])
    assert run.returncode == 2
    assert run.stderr.startswith(f"error: config.eval.inception_weights='{tmp_path / 'pt_inception.npz'}': no such file")
    assert run.stderr.count("\n") == 1 and inception.URL in run.stderr and not os.path.exists(tmp_path / "run")


def test_trainer_sample_reports_fid_against_the_cached_test_statistics(net, weights, tmp_path):
    rng = np.random.default_rng(10)
    (tmp_path / "data").mkdir()
    np.savez(tmp_path / "data" / "train.npz", images=rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8))
    test_images = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "data" / "test.npz", images=test_images)
    config = load_config("test")
    config.data.source, config.data.kwargs.path = "npz", str(tmp_path / "data")
    config.train.batch_size, config.eval.batch_size = 8, BATCH  # eval.batch_size: FID's batches too
    config.sample.num_images, config.sample.steps = 4, 2
    config.model.network, config.model.network_kwargs = "mlp", {"hidden": 16, "depth": 1}  # compiles in a second
    config.model.schedule, config.model.schedule_kwargs = "fixed_linear", {}
    config.eval.inception_weights = weights[0]
    workdir = str(tmp_path / "run")
    trainer = train.Trainer(config, workdir)
    try:
        from vdm import metrics

        with metrics.MetricWriter(workdir, enable_tensorboard=False) as writer:
            result = trainer.sample(0, writer)
        samples = np.load(os.path.join(workdir, "samples_0.npz"))["images"]
        # Independently: the features of both sets, and the Fréchet distance of two rank-deficient Gaussians from
        # the singular values of A_s A_r^T (A: centred features), tr (C_r^1/2 C_s C_r^1/2)^1/2 = sum sv / sqrt(3 * 4).
        fs, fr = (inception.features(net, x, batch_size=BATCH).astype(np.float64) for x in (samples, test_images))
        a_s, a_r = fs - fs.mean(0), fr - fr.mean(0)
        trace_root = np.linalg.svd(a_s @ a_r.T, compute_uv=False).sum() / math.sqrt(3 * 4)
        expected = np.sum((fs.mean(0) - fr.mean(0)) ** 2) + np.sum(a_s ** 2) / 3 + np.sum(a_r ** 2) / 4 - 2 * trace_root
        assert result["fid"] == pytest.approx(expected, rel=1e-5) and 0 < result["fid"] < np.inf
        assert (result["fid_images"], result["fid_reference_images"]) == (4, 5)
        logged = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
        assert logged[-1]["fid"] == pytest.approx(result["fid"]) and logged[-1]["step"] == 0
        # The test statistics are cached under the data's name and the weights file's hash, and read back: a cache
        # holding the samples' own statistics gives FID 0.
        sha = hashlib.sha256(open(weights[0], "rb").read()).hexdigest()[:16]
        assert [os.path.basename(p) for p in glob.glob(os.path.join(workdir, "fid_reference_*"))] == [
            f"fid_reference_npz_{sha}.npz"]
        mu, cov = quality.gaussian_statistics(fs)
        np.savez(os.path.join(workdir, f"fid_reference_npz_{sha}.npz"), mu=mu, cov=cov, count=5)
        assert abs(trainer.sample(0)["fid"]) < 1e-6 * np.trace(cov)
    finally:
        trainer.close()
