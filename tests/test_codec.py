"""vdm.codec: bits-back ANS over the T-step model, round trips bit for bit, its rate against L_T, its file's checks."""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from tests.conftest import load_config, run_python
from vdm import analytic, diffusion
from vdm.codec import CodecError, Pieces, compress_with, decompress_with, format as format_lib

GMIN, GMAX = -13.3, 5.0


def gaussian_pieces(shape, vocab_size, scale=0.25, elementwise=False, fingerprint="analytic"):
    """vdm.analytic's Bayes-optimal denoiser for Gaussian data of ``shape``, under a linear schedule (per element:
    each element's endpoints shifted a little)."""
    dim = math.prod(shape)
    data = analytic.GaussianData(dim, scale)
    shift = jnp.linspace(-0.5, 0.5, dim).reshape(shape)

    def gamma_fn(t):
        g = GMIN + (GMAX - GMIN) * t
        return g[:, None].reshape((-1,) + (1,) * len(shape)) + shift if elementwise else g

    def eps_fn(z, gamma, cond=None):
        b = z.shape[0]
        return data.eps_fn(z.reshape(b, -1), gamma.reshape(b, -1) if elementwise else gamma).reshape(z.shape)

    return Pieces(eps_fn, gamma_fn, vocab_size, tuple(shape), fingerprint=fingerprint), data


def gaussian_images(data, n, shape, vocab_size, seed=0):
    f = data.sample(jax.random.PRNGKey(seed), n)
    return np.asarray(diffusion.decode(f, vocab_size), np.uint8).reshape((n,) + tuple(shape))


@pytest.mark.parametrize("shape,vocab_size,elementwise", [((8,), 256, False), ((4, 4, 1), 17, False),
                                                          ((2, 3, 2), 5, True)])
def test_round_trip_bit_for_bit_and_bits_are_the_information_given_to_the_coder(shape, vocab_size, elementwise):
    pieces, data = gaussian_pieces(shape, vocab_size, elementwise=elementwise)
    images = gaussian_images(data, 11, shape, vocab_size)
    stats = {}
    blob = compress_with(pieces, images, 20, batch_size=4, stats=stats)  # 3 batches in one stream
    out = decompress_with(pieces, blob)
    assert out.dtype == np.uint8 and np.array_equal(out, images)
    assert compress_with(pieces, images, 20, batch_size=4) == blob  # deterministic
    # the words written beyond the initial ones = the sum of -log2 p written minus -log2 q read (second method:
    # scipy's Gaussian CDF), within the ANS state (64 bits) and constriction's 24-bit probabilities
    net, info = stats["payload_bits"] - stats["initial_bits"], stats["info_bits"].sum()
    assert abs(net - info) <= 64 + 0.01 * abs(info), (net, info)


def expected_lt_nats(images, vocab_size, scale, num_steps):
    """Each image's L_T in nats (float64): closed forms given x for the prior and the diffusion terms (the analytic
    denoiser is linear: E(eps - a z)^2 = (1 - a sigma)^2 + a^2 alpha^2 f^2) and Gauss-Hermite for the decoder."""
    f = 2 * (images.reshape(len(images), -1).astype(np.float64) + 0.5) / vocab_size - 1

    def g(t):
        return GMIN + (GMAX - GMIN) * t

    prior = 0.5 * (special.expit(-g(1.0)) * (f * f - 1) + np.log1p(np.exp(-g(1.0))))
    diff = np.zeros_like(f)
    for i in range(1, num_steps + 1):
        gt, gs = g(i / num_steps), g((i - 1) / num_steps)
        a2, s2 = special.expit(-gt), special.expit(gt)
        a = np.sqrt(s2) / (a2 * scale**2 + s2)
        diff += 0.5 * np.expm1(gt - gs) * ((1 - a * np.sqrt(s2)) ** 2 + a * a * a2 * f * f)
    nodes, weights = np.polynomial.hermite_e.hermegauss(120)
    weights = weights / weights.sum()
    a0, s0 = math.sqrt(special.expit(-g(0.0))), math.sqrt(special.expit(g(0.0)))
    centres = 2 * (np.arange(vocab_size) + 0.5) / vocab_size - 1
    z = a0 * centres[:, None] + s0 * nodes  # [V, nodes]
    logits = -0.5 * (z[..., None] / a0 - centres) ** 2 * math.exp(-g(0.0))  # [V, nodes, V]
    log_p = logits[np.arange(vocab_size), :, np.arange(vocab_size)] - special.logsumexp(logits, axis=-1)
    rec = -(log_p * weights).sum(axis=1)[images.reshape(len(images), -1).astype(int)]
    return (prior + diff + rec).sum(axis=1)


# The rate's gap to L_T on this model at T = 100 (the grid, and reads that are not quite fresh samples of q; see
# vdm.codec.discretise's table): what the test allows beyond the standard error, in bits/dim.
GAP_BPD = 0.15


def test_rate_of_a_sample_is_the_analytic_discrete_time_bound():
    shape, vocab_size, scale, num_steps, n = (8, 8, 1), 256, 0.25, 100, 64
    pieces, data = gaussian_pieces(shape, vocab_size, scale)
    images = gaussian_images(data, n, shape, vocab_size, seed=1)
    stats = {}
    blob = compress_with(pieces, images, num_steps, stats=stats)
    assert np.array_equal(decompress_with(pieces, blob), images)
    dims = math.prod(shape)
    lt = expected_lt_nats(images, vocab_size, scale, num_steps) / (dims * math.log(2))
    # the closed form agrees with vdm.analytic's E[L_T] for the diffusion term (the images' second moment ~ scale^2)
    rate = stats["info_bits"] / dims
    gap = rate - lt
    se = gap.std(ddof=1) / math.sqrt(n)
    assert abs(gap.mean()) < 4 * se + GAP_BPD, (rate.mean(), lt.mean(), se)
    net = (stats["payload_bits"] - stats["initial_bits"]) / (n * dims)
    assert abs(net - rate.mean()) < 64 / (n * dims) + 0.01 * rate.mean()
    assert 32 * len(format_lib.unpack(blob)[1]) == stats["payload_bits"]  # the file: header + these words


def test_bad_inputs_are_one_error_naming_them():
    pieces, data = gaussian_pieces((4,), 17)
    images = gaussian_images(data, 3, (4,), 17)
    for bad, what in [(0, "num_steps"), (-3, "num_steps"), (2.5, "num_steps")]:
        with pytest.raises(CodecError, match=what):
            compress_with(pieces, images, bad)
    with pytest.raises(CodecError, match="shape"):
        compress_with(pieces, images.reshape(3, 2, 2), 20)
    with pytest.raises(CodecError, match="out of range"):
        compress_with(pieces, np.full((3, 4), 17, np.uint8), 20)
    blob = compress_with(pieces, images, 20)
    header_end = len(blob) - 4 * len(format_lib.unpack(blob)[1])
    for i in [5, 20, header_end - 40, header_end - 1, header_end + 2, len(blob) - 1]:  # header, checksum, payload
        flipped = bytearray(blob)
        flipped[i] ^= 0x10
        with pytest.raises(CodecError, match="checksum|newer|truncated"):
            decompress_with(pieces, bytes(flipped))
    for cut in [3, 10, header_end - 5, len(blob) - 4]:
        with pytest.raises(CodecError, match="truncated|checksum|not a .vdmz"):
            decompress_with(pieces, blob[:cut])
    newer = bytearray(blob)
    newer[4] = format_lib.VERSION + 1
    with pytest.raises(CodecError, match="newer"):
        decompress_with(pieces, bytes(newer))
    other, _ = gaussian_pieces((4,), 17, fingerprint="another")
    with pytest.raises(CodecError, match="another model"):
        decompress_with(other, blob)
    import dataclasses
    with pytest.raises(CodecError, match="step 0"):
        decompress_with(dataclasses.replace(pieces, step=7), blob)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """configs/test.py trained 4 steps into a workdir."""
    from vdm import train

    workdir = str(tmp_path_factory.mktemp("codec") / "run")
    train.train_and_evaluate(load_config("test"), workdir)
    return workdir


def test_a_trained_model_round_trips_across_processes(trained, tmp_path):
    from vdm import codec

    images = np.random.default_rng(0).integers(0, 17, (5, 8, 8, 1)).astype(np.uint8)
    np.savez(tmp_path / "in.npz", images=images)
    blob = codec.compress(load_config("test"), trained, str(tmp_path / "in.npz"), num_steps=50)
    (tmp_path / "x.vdmz").write_bytes(blob)
    assert np.array_equal(codec.decompress(load_config("test"), trained, blob), images)
    script = ("import sys, numpy as np; from vdm import codec, configs; "
              f"out = codec.decompress(configs.get('test'), {trained!r}, {str(tmp_path / 'x.vdmz')!r}); "
              f"np.save({str(tmp_path / 'out.npy')!r}, out)")
    run = run_python(["-c", script])
    assert run.returncode == 0, run.stderr[-2000:]
    assert np.array_equal(np.load(tmp_path / "out.npy"), images)
    with pytest.raises(CodecError, match="num_steps"):
        codec.compress(load_config("test"), trained, images, num_steps=0)
    before = sorted(os.listdir(trained))
    from vdm import data as data_lib
    with pytest.raises(data_lib.DataError, match="out of range"):
        codec.compress(load_config("test"), trained, np.full((2, 8, 8, 1), 17, np.uint8), num_steps=5)
    assert sorted(os.listdir(trained)) == before
