"""The sampler of a run, compiled in chunks: progress between them, and a signal stops it soon.

``Sampling(generation)`` compiles the ``vdm.samplers.Generation`` that ``generation(params, rng,
labels)`` builds in three parts (start, advance ``lo..hi`` steps, finish), so that its loop runs
in chunks of about ``CHUNK_SECONDS`` each. The samples equal those of one compiled call.
"""
from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp

from vdm import samplers as samplers_lib


class Sampling:
    """config.sample's sampler compiled in three parts, so that its loop runs in chunks of steps
    (one compiled call each, any chunk length): progress is shown between chunks and a signal
    stops sampling at the end of the current chunk. The samples equal those of one call.

    ``generation(params, rng, labels)`` builds the ``vdm.samplers.Generation``; it is rebuilt
    inside each compiled part, which costs nothing at run time.
    """

    CHUNK_SECONDS = 0.5  # the aim for one chunk's wall time (single process)

    def __init__(self, generation: Callable):
        self._generation = generation

        def start(params, rng, labels):
            g = generation(params, rng, labels)
            return g.plan.init(g.z_1)

        def advance(params, rng, labels, carry, lo, hi):
            return samplers_lib.advance(generation(params, rng, labels).plan, carry, lo, hi)

        def finish(params, rng, labels, carry):
            g = generation(params, rng, labels)
            z_0, nfe = g.plan.result(carry)
            non_finite = jnp.sum(~jnp.all(jnp.isfinite(z_0.reshape(z_0.shape[0], -1)), axis=1))
            return g.decode(z_0), nfe, non_finite

        self._start, self._advance, self._finish = jax.jit(start), jax.jit(advance), jax.jit(finish)

    def num_steps(self, params, rng, labels) -> int:
        """The length of the sampler's loop (a static number: found by tracing, nothing runs)."""
        lengths = []
        jax.eval_shape(lambda *args: lengths.append(self._generation(*args).plan.num_steps) or 0, params, rng, labels)
        return lengths[0]

    def __call__(self, params, rng, labels, progress: Callable[[int, int], None] | None = None):
        """(images, nfe, how many images' final z (z_0) hold a NaN or infinity: the decoder would draw
        those as if they were black); ``progress(done, total)`` is called after each chunk."""
        total = self.num_steps(params, rng, labels)
        carry = self._start(params, rng, labels)
        done, chunk = 0, 1
        fixed = jax.process_count() > 1  # every process must run the same chunks
        if fixed:
            chunk = max(1, -(-total // 20))
        while done < total:
            stop = min(total, done + chunk)
            began = time.perf_counter()
            with samplers_lib.naming_max_steps("sample.sampler_kwargs.max_steps"):
                carry = jax.block_until_ready(self._advance(params, rng, labels, carry, done, stop))
            took = time.perf_counter() - began
            if not fixed:  # the first chunk includes the compilation, so it stays at one step; then ~0.5 s
                chunk = int(min(4 * chunk, max(1, self.CHUNK_SECONDS * (stop - done) / max(took, 1e-6))))
            done = stop
            if progress is not None:
                progress(done, total)
        return self._finish(params, rng, labels, carry)
