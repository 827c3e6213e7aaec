"""Lossless compression with a trained VDM: bits-back ANS over its T-step discrete-time model.

    data = vdm.codec.compress("digits", "workdirs/digits", "digits.npz", num_steps=100)
    images = vdm.codec.decompress("digits", "workdirs/digits", data)     # bit for bit

The images are taken as ``--mode score`` takes them (``vdm.image_bpd.read_images``: an ``.npz`` path, a folder of PNG
files, a uint8 array [N, H, W, C]); the model is the workdir's latest checkpoint, EMA parameters. The discrete-time
model of T = ``num_steps`` steps (the VDM paper's L_T: t_i = i / T; p(z_s | z_t) Gaussian with the model's mean and
the posterior variance; p(z_1) = N(0, I); the exact discretised decoder p(x | z_0) of ``vdm.diffusion``) is coded
by bits-back ANS (Townsend, Bird, Barber 2019) in Bit-Swap's order (``vdm.codec.ans``) with ``constriction``; the
latents lie on the grid of ``vdm.codec.discretise``; the file is ``vdm.codec.format``'s.

Size: the file holds ``initial_words`` random 32-bit words the stream starts from (the first bits-back read needs
them: about D (log2(sqrt(2 pi e) / fraction) + 1 + log2(1 / sqrt(c_1))) bits per image of the first batch) plus
the net rate, whose mean is L_T up to the grid's error, plus at most 64 bits of ANS state. ``compress_with``'s
``stats`` reports both.

Guarantees: the same machine and backend decode bit for bit (every probability the coder is given is computed by
the same jitted float32 function of the same inputs on the CPU, in the same batches); decoded images are checked
against the sha256 in the header, so another platform's arithmetic is detected, never returned as a wrong image.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable

import constriction
import jax
import jax.numpy as jnp
import numpy as np

from vdm import diffusion
from vdm.codec import ans, discretise, format as format_lib
from vdm.codec.discretise import Grid
from vdm.codec.format import CodecError, Header

__all__ = ["CodecError", "Grid", "Pieces", "compress", "compress_with", "decompress", "decompress_with",
           "DEFAULT_BATCH_SIZE", "INITIAL_SEED"]

DEFAULT_BATCH_SIZE = 64  # images per network call
INITIAL_SEED = 0x56444D5A  # the seed of the stream's initial random words


@dataclasses.dataclass(frozen=True)
class Pieces:
    """The model as the codec needs it.

    Attributes:
        eps_fn: ``(z [B, *shape], gamma, cond) -> eps_hat [B, *shape]``, gamma per example [B] or per element.
        gamma_fn: ``t [n] -> gamma`` [n] or [n, *shape].
        vocab_size: V, the pixel levels.
        shape: one image's shape.
        num_classes: 0, or the classes of a conditional model (``cond = {"label": int [B]}``).
        fingerprint: names the parameters (a file from other ones is refused).
        step: the checkpoint's step.
    """

    eps_fn: Callable
    gamma_fn: Callable
    vocab_size: int
    shape: tuple
    num_classes: int = 0
    fingerprint: str = ""
    step: int = 0


def _check_num_steps(num_steps) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise CodecError(f"num_steps must be a positive integer, got {num_steps!r}")


def _gammas(pieces: Pieces, num_steps: int) -> np.ndarray:
    """gamma(t_i), t_i = i / T, float32 [T + 1, E] (E = 1 per example, D per element), on the CPU."""
    t = (np.arange(num_steps + 1, dtype=np.float64) / num_steps).astype(np.float32)
    with jax.default_device(jax.devices("cpu")[0]):
        g = np.asarray(jax.jit(pieces.gamma_fn)(jnp.asarray(t)), np.float32)
    return g.reshape(num_steps + 1, -1)


def _functions(pieces: Pieces, gammas: np.ndarray) -> Callable[[dict | None], ans.Functions]:
    """``cond -> `` the coder's view of the model for a batch with ``cond`` (its labels or None): float32 on the
    CPU, compiled once for every batch of a size."""
    shape, V, elementwise = tuple(pieces.shape), pieces.vocab_size, gammas.shape[1] > 1
    cpu = jax.devices("cpu")[0]

    def levels(g, b):
        return jnp.broadcast_to(g.reshape((1,) + shape), (b,) + shape) if elementwise else jnp.broadcast_to(g, (b,))

    @jax.jit
    def reverse_mean(z, g_t, g_s, cond):
        z = z.reshape((-1,) + shape)
        g_t, g_s = levels(g_t, z.shape[0]), levels(g_s, z.shape[0])
        eps_hat = pieces.eps_fn(z, g_t, cond)
        g_t, g_s = diffusion.expand_to(g_t, z), diffusion.expand_to(g_s, z)
        c = -jnp.expm1(g_s - g_t)
        ratio = jnp.exp(0.5 * (jax.nn.log_sigmoid(-g_s) - jax.nn.log_sigmoid(-g_t)))  # alpha_s / alpha_t
        sigma_t = jnp.exp(0.5 * jax.nn.log_sigmoid(g_t))
        return (ratio * (z - sigma_t * c * eps_hat)).reshape(z.shape[0], -1)

    @jax.jit
    def decoder_probs(z, g_0):
        z = z.reshape((-1,) + shape)
        return jnp.exp(diffusion.decoder_log_probs(z, diffusion.expand_to(levels(g_0, z.shape[0]), z), V))

    def for_cond(cond):
        def mean(z, i):
            with jax.default_device(cpu):
                return np.asarray(reverse_mean(z, gammas[i], gammas[i - 1], cond), np.float64)

        def probs(z):
            with jax.default_device(cpu):
                return np.asarray(decoder_probs(z, gammas[0]), np.float64).reshape(-1, V)

        return ans.Functions(mean, probs, V)

    return for_cond


def _initial(count: int) -> np.ndarray:
    words = np.random.default_rng(INITIAL_SEED).integers(0, 2**32, size=count, dtype=np.uint32)
    words[-1] |= np.uint32(1 << 31)  # the coder's state: its top word is never 0
    return words


def _check_images(pieces: Pieces, images, labels):
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise CodecError(f"images have dtype {images.dtype}, expected uint8")
    if images.ndim < 1 or images.shape[1:] != tuple(pieces.shape) or len(images) == 0:
        raise CodecError(f"images have shape {images.shape}; the model takes [N, {', '.join(map(str, pieces.shape))}]")
    if int(images.max()) >= pieces.vocab_size:
        raise CodecError(f"pixel value {int(images.max())} is out of range for the model's {pieces.vocab_size} levels")
    if pieces.num_classes:
        if labels is None or np.shape(labels) != (len(images),):
            raise CodecError(f"the model is class-conditional ({pieces.num_classes} classes): give one label per image")
        labels = np.asarray(labels, np.int64)
        if labels.min() < 0 or labels.max() >= pieces.num_classes:
            raise CodecError(f"a label is out of range for the model's {pieces.num_classes} classes")
    else:
        labels = None
    return images, labels


def _batches(count: int, batch_size: int):
    return [(s, min(s + batch_size, count)) for s in range(0, count, batch_size)]


def compress_with(pieces: Pieces, images, num_steps: int, *, labels=None, grid: Grid = Grid(),
                  batch_size: int = DEFAULT_BATCH_SIZE, stats: dict | None = None) -> bytes:
    """The ``.vdmz`` bytes of ``images`` (uint8 [N, *pieces.shape]) under the T = ``num_steps`` model of ``pieces``.

    Args:
        pieces: the model (``Pieces``).
        images: uint8 [N, *shape], values below ``pieces.vocab_size``.
        num_steps: T >= 1.
        labels: int [N], the classes of a conditional model (ignored by an unconditional one).
        grid: the latents' discretisation (``vdm.codec.discretise``).
        batch_size: images per network call; the batches are coded one after another into one stream.
        stats: where given, filled with ``info_bits`` (float64 [N], each image's net information content: the
            -log2 probabilities written minus those read), ``initial_bits`` and ``payload_bits`` (the words').

    Returns:
        The file's bytes (``vdm.codec.format``).

    Raises:
        CodecError: num_steps not positive, images that do not fit the model, a latent the model cannot code.
    """
    _check_num_steps(num_steps)
    images, labels = _check_images(pieces, images, labels)
    try:
        grid.check()
    except ValueError as e:
        raise CodecError(str(e)) from None
    if batch_size < 1:
        raise CodecError(f"batch_size must be positive, got {batch_size}")
    gammas = _gammas(pieces, num_steps)
    plan = discretise.plan(gammas, grid)
    n, flat = len(images), images.reshape(len(images), -1).astype(np.int64)
    initial = discretise.initial_words(plan, min(n, batch_size) * flat.shape[1])
    coder = constriction.stream.stack.AnsCoder(_initial(initial))
    info, functions = np.zeros(n), _functions(pieces, gammas)
    for start, stop in _batches(n, batch_size):
        cond = None if labels is None else {"label": jnp.asarray(labels[start:stop], jnp.int32)}
        part = None if stats is None else {"bits": np.zeros(stop - start)}
        ans.encode_batch(coder, flat[start:stop], plan, functions(cond), part)
        if part is not None:
            info[start:stop] = part["bits"]
    words = coder.get_compressed()
    if stats is not None:
        stats.update(info_bits=info, initial_bits=32 * initial, payload_bits=32 * len(words))
    header = Header(pieces.fingerprint, int(pieces.step), int(num_steps), dataclasses.asdict(grid),
                    tuple(pieces.shape), n, pieces.vocab_size, int(batch_size), initial,
                    None if labels is None else tuple(int(y) for y in labels),
                    format_lib.images_digest(images, labels))
    return format_lib.pack(header, words)


def check_header(header: Header, pieces: Pieces) -> None:
    """Raises CodecError unless the file's ``header`` was written with the model of ``pieces``: another step or
    another model (its fingerprint, data shape or levels) is one line naming which."""
    if header.step != pieces.step:
        raise CodecError(f"the file was compressed with the checkpoint of step {header.step}; this model's is "
                         f"step {pieces.step}")
    if header.fingerprint != pieces.fingerprint:
        raise CodecError(f"the file was compressed with another model (fingerprint {header.fingerprint[:12]}, this "
                         f"model's {pieces.fingerprint[:12]})")
    if tuple(header.shape) != tuple(pieces.shape) or header.vocab_size != pieces.vocab_size:
        raise CodecError(f"the file holds images of shape {header.shape} and {header.vocab_size} levels; the model "
                         f"takes {tuple(pieces.shape)} and {pieces.vocab_size}")


def decompress_with(pieces: Pieces, data: bytes) -> np.ndarray:
    """The images (uint8 [N, *shape]) of ``.vdmz`` bytes ``data`` written by ``compress_with`` with ``pieces``.

    Raises:
        CodecError: not such a file, a newer format, a truncated or altered file, another model or step, or decoded
            images that fail their checksum.
    """
    header, words = format_lib.unpack(data)
    check_header(header, pieces)
    try:
        grid = Grid(**header.grid)
        grid.check()
        _check_num_steps(header.num_steps)
    except (TypeError, ValueError) as e:
        raise CodecError(f"unreadable header ({e})") from None
    gammas = _gammas(pieces, header.num_steps)
    plan = discretise.plan(gammas, grid)
    labels = None if header.labels is None else np.asarray(header.labels, np.int64)
    dims = int(np.prod(header.shape))
    coder = constriction.stream.stack.AnsCoder(words)
    flat, functions = np.zeros((header.count, dims), np.int64), _functions(pieces, gammas)
    for start, stop in reversed(_batches(header.count, header.batch_size)):
        cond = None if labels is None else {"label": jnp.asarray(labels[start:stop], jnp.int32)}
        flat[start:stop] = ans.decode_batch(coder, stop - start, dims, plan, functions(cond))
    rest = coder.get_compressed()
    images = flat.astype(np.uint8).reshape((header.count,) + tuple(header.shape))
    if not np.array_equal(rest, _initial(header.initial_words)) or \
            format_lib.images_digest(images, labels) != header.images_sha256:
        raise CodecError("the decoded images fail their checksum: the file was written on another platform or "
                         "backend (or damaged); nothing is returned")
    return images


def params_fingerprint(params) -> str:
    """The hex sha256 of a parameter tree's leaves (their paths, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        leaf = np.asarray(jax.device_get(leaf))
        h.update(f"{jax.tree_util.keystr(path)}:{leaf.dtype}:{leaf.shape};".encode())
        h.update(np.ascontiguousarray(leaf).tobytes())
    return h.hexdigest()


from vdm.codec.checkpointed import compress, decompress  # noqa: E402  (the workdir's model: uses the above)
