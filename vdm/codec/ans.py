"""Bits-back ANS over the T-step model, one batch of images at a time, with ``constriction``'s stack coder.

The order is Bit-Swap's (Kingma, Abbeel, Ho 2019) for the forward (Markov) inference chain of the diffusion:
to encode x, read z_0 ~ q(z_0 | x) from the stream (bits back), write x under p(x | z_0); for i = 1..T read
z_{t_i} ~ q(z_{t_i} | z_{t_{i-1}}) and write z_{t_{i-1}} under p(z_{t_{i-1}} | z_{t_i}); write z_1 under p(z_1).
The net length is -log p(x, z) + log q(z | x), whose mean over q is the T-step bound L_T. Decoding runs every
operation backwards: read z_1 under p(z_1); for i = T..1 read z_{t_{i-1}} under p(. | z_{t_i}) and write z_{t_i}
back under q(z_{t_i} | z_{t_{i-1}}); read x under p(x | z_0); write z_0 back under q(z_0 | x).

Each operation is one vectorised call of the coder over the batch's values; each step one network call for the
batch. The latents are integers k on the grid of ``vdm.codec.discretise`` (z = k delta); a Gaussian is coded as
``constriction``'s ``QuantizedGaussian`` of k - round(mean / delta) over its window.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import constriction
import numpy as np
from scipy import special

from vdm.codec.discretise import Plan
from vdm.codec.format import CodecError

_MIN_PROBABILITY = 2.0 ** -24  # constriction's default precision: the least mass a symbol gets


@dataclasses.dataclass(frozen=True)
class Functions:
    """The model as the coder uses it, on flattened batches [B, D] (float64 out, computed in float32).

    Attributes:
        reverse_mean: ``(z [B, D] float32, i) -> mean of p(z_{t_{i-1}} | z_{t_i} = z)`` [B, D].
        decoder_probs: ``z_0 [B, D] float32 -> p(x = k | z_0)`` [B D, V].
        vocab_size: V.
    """

    reverse_mean: Callable[[np.ndarray, int], np.ndarray]
    decoder_probs: Callable[[np.ndarray], np.ndarray]
    vocab_size: int


def _gaussian(mean, std, delta, window):
    """(anchor [B, D] int64, mean in bins relative to the anchor [B D], std in bins [B D]) of N(mean, std^2)."""
    scaled = mean / delta
    anchor = np.rint(scaled)
    return anchor.astype(np.int64), (scaled - anchor).ravel(), np.broadcast_to(std / delta, scaled.shape).ravel()


def _gaussian_bits(j, m, s, window):
    """-log2 of the clipped, renormalised quantised Gaussian's mass at j (float64 [B D]): the coder's, up to its
    quantisation of the probabilities."""
    mass = special.ndtr((j + 0.5 - m) / s) - special.ndtr((j - 0.5 - m) / s)
    total = special.ndtr((window + 0.5 - m) / s) - special.ndtr((-window - 0.5 - m) / s)
    return -np.log2(np.maximum(mass / total, _MIN_PROBABILITY))


def _count(stats, bits, shape, sign):
    if stats is not None:
        stats["bits"] += sign * bits.reshape(shape).sum(axis=1)


def _order(step: int, size: int) -> np.ndarray:
    """The order in which step ``step`` reads its latent's values under q: a fixed permutation of its own.

    A stack coder's next read takes the quantile of the value written last (``push`` then ``pop`` under one model
    is the identity), so reading z_{t_{i+1}} in the order z_{t_{i-1}} was written would make each value's forward
    noise its own reverse residual two steps before, and a model's error would compound along each value's chain
    (measured: the latents run away within tens of steps). Read in another order, a residual becomes the noise of
    an unrelated value."""
    return np.random.default_rng([0x5644, step]).permutation(size)


def pop_gaussian(coder, mean, std, delta, window: int, stats=None, order=None) -> np.ndarray:
    """Read latents k [B, D] (int64, on the grid ``delta``) from the stream under N(mean, std^2), the values in
    ``order`` (flat indices; None: as they lie)."""
    anchor, m, s = _gaussian(mean, std, delta, window)
    order = np.arange(m.size) if order is None else order
    j = np.empty(m.size, np.int64)
    j[order] = coder.decode(constriction.stream.model.QuantizedGaussian(-int(window), int(window)), m[order], s[order])
    _count(stats, None if stats is None else _gaussian_bits(j, m, s, window), anchor.shape, -1)
    return anchor + j.reshape(anchor.shape).astype(np.int64)


def push_gaussian(coder, k, mean, std, delta, window: int, what: str, stats=None, order=None) -> None:
    """Write latents k [B, D] to the stream under N(mean, std^2), in ``order`` (as ``pop_gaussian``).

    Raises CodecError when one lies outside the window (``what`` names the latent): the model's mean is too far off
    to code these images (a model far from the data at few steps: the reads then compound its error)."""
    anchor, m, s = _gaussian(mean, std, delta, window)
    j = (k - anchor).ravel()
    if np.max(np.abs(j)) > window:
        far = float(np.max(np.abs(j - m) / s))
        raise CodecError(f"{what}: a latent lies {far:.0f} standard deviations from the model's mean (the coder's "
                         f"window is {window / np.max(s):.0f}): this model cannot code these images")
    order = np.arange(m.size) if order is None else order
    coder.encode_reverse(j[order].astype(np.int32),
                         constriction.stream.model.QuantizedGaussian(-int(window), int(window)), m[order], s[order])
    _count(stats, None if stats is None else _gaussian_bits(j, m, s, window), anchor.shape, 1)


def _categorical_bits(x, probs):
    p = probs[np.arange(len(x)), x] / probs.sum(axis=1)
    return -np.log2(np.maximum(p, _MIN_PROBABILITY))


def _data_mean(plan: Plan, x: np.ndarray, vocab_size: int) -> np.ndarray:
    """The mean of q(z_0 | x): alpha_0 encode(x), float64 [B, D]."""
    return plan.alpha[0] * (2.0 * (x + 0.5) / vocab_size - 1.0)


def _z(plan: Plan, i: int, k: np.ndarray) -> np.ndarray:
    return k * plan.delta[i]


def encode_batch(coder, x: np.ndarray, plan: Plan, fns: Functions, stats: dict | None = None) -> None:
    """Push the images ``x`` (int [B, D] in 0..V-1) onto ``coder`` by bits-back coding (the module's order).
    ``stats``: where given, ``stats["bits"]`` [B] gains each image's net information content in bits."""
    T, V = plan.num_steps, fns.vocab_size
    k_prev = pop_gaussian(coder, _data_mean(plan, x, V), plan.q_std[0], plan.delta[0], plan.q_window[0], stats)
    probs = fns.decoder_probs(_z(plan, 0, k_prev).astype(np.float32))
    coder.encode_reverse(x.ravel().astype(np.int32), constriction.stream.model.Categorical(perfect=False), probs)
    _count(stats, None if stats is None else _categorical_bits(x.ravel(), probs), x.shape, 1)
    for i in range(1, T + 1):
        forward = plan.alpha[i] / plan.alpha[i - 1] * _z(plan, i - 1, k_prev)
        k = pop_gaussian(coder, forward, plan.q_std[i], plan.delta[i], plan.q_window[i], stats, _order(i, x.size))
        mean = fns.reverse_mean(_z(plan, i, k).astype(np.float32), i)
        push_gaussian(coder, k_prev, mean, plan.p_std[i - 1], plan.delta[i - 1], plan.p_window[i - 1],
                      f"step {i} of {T}", stats)
        k_prev = k
    push_gaussian(coder, k_prev, np.zeros(k_prev.shape), 1.0, plan.delta[T], plan.p_window[T], "the prior", stats)


def decode_batch(coder, batch: int, dims: int, plan: Plan, fns: Functions) -> np.ndarray:
    """Pop ``batch`` images of ``dims`` values (int64 [B, D]) from ``coder``: ``encode_batch`` run backwards."""
    T, V = plan.num_steps, fns.vocab_size
    k = pop_gaussian(coder, np.zeros((batch, dims)), 1.0, plan.delta[T], plan.p_window[T])
    for i in range(T, 0, -1):
        mean = fns.reverse_mean(_z(plan, i, k).astype(np.float32), i)
        k_prev = pop_gaussian(coder, mean, plan.p_std[i - 1], plan.delta[i - 1], plan.p_window[i - 1])
        forward = plan.alpha[i] / plan.alpha[i - 1] * _z(plan, i - 1, k_prev)
        push_gaussian(coder, k, forward, plan.q_std[i], plan.delta[i], plan.q_window[i], f"step {i} of {T}",
                      order=_order(i, k.size))
        k = k_prev
    probs = fns.decoder_probs(_z(plan, 0, k).astype(np.float32))
    x = coder.decode(constriction.stream.model.Categorical(perfect=False), probs).reshape(batch, dims).astype(np.int64)
    push_gaussian(coder, k, _data_mean(plan, x, V), plan.q_std[0], plan.delta[0], plan.q_window[0], "the data")
    return x
