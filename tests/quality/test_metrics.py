"""The quality numbers on real digits: FID, KID, mode coverage, and the classifier behind them."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from pipeline.config import ConfigError, validate
from pipeline.quality import digits, metrics
from pipeline.quality.features import make_extractor


@pytest.fixture(scope="module")
def labelled():
    return digits.labelled_digits()


@pytest.fixture(scope="module")
def extractor(tmp_path_factory):
    from pipeline.data import ensure_prepared, local_prepared_dir

    cfg = validate({"data": {"source": "digits", "prepared_dir": str(tmp_path_factory.mktemp("digits"))}})
    ensure_prepared(cfg.data)
    return make_extractor(cfg, local_prepared_dir(cfg.data))  # trained once per session into DCGAN_CACHE_DIR


def with_noise(images: np.ndarray, sigma: float) -> np.ndarray:
    noise = np.random.default_rng(7).normal(0.0, sigma, images.shape)
    return np.clip(images.astype(np.float64) + noise, 0, 255).round().astype(np.uint8)


def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula, with scipy's matrix square root: the reference we must match."""
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * root))


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_noise(labelled, extractor):
    images, _ = labelled
    real, _ = extractor.embed(images)
    scores = [metrics.frechet_distance(real, extractor.embed(with_noise(images, sigma))[0]) for sigma in (8, 24, 48, 96)]
    assert all(a < b for a, b in zip(scores, scores[1:])), scores
    assert abs(metrics.frechet_distance(real, real)) < 1e-6 * scores[0]


def test_fid_matches_the_scipy_sqrtm_reference(labelled, extractor):
    images, _ = labelled
    a, _ = extractor.embed(images[0::2])
    b, _ = extractor.embed(with_noise(images[1::2], 30))
    ours, reference = metrics.frechet_distance(a, b), scipy_fid(a, b)
    assert ours == pytest.approx(reference, rel=1e-6), (ours, reference)


def test_kid_is_near_zero_for_two_real_halves_and_large_for_one_class(labelled, extractor):
    images, labels = labelled
    a, _ = extractor.embed(images[0::2])
    b, _ = extractor.embed(images[1::2])
    threes, _ = extractor.embed(images[labels == 3])
    same, _ = metrics.kernel_distance(a, b, subset_size=150)
    different, _ = metrics.kernel_distance(a, threes, subset_size=150)
    assert abs(same) < 0.02 * different, (same, different)
    assert metrics.kernel_distance(a, b, 150, seed=1) == metrics.kernel_distance(a, b, 150, seed=1)


def test_the_classifier_trains_bit_identically(labelled):
    images, labels = labelled
    first, accuracy = digits.train(images, labels, epochs=2)
    second, _ = digits.train(images, labels, epochs=2)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    assert accuracy > 0.8  # two epochs already separate the digits


def test_coverage_and_class_kl_tell_one_class_from_all_ten(labelled, extractor):
    images, labels = labelled
    _, all_classes = extractor.embed(images)
    _, only_threes = extractor.embed(images[labels == 3])
    assert metrics.mode_coverage(all_classes) == 1.0
    assert metrics.class_kl(all_classes) < 0.01
    assert metrics.mode_coverage(only_threes) == pytest.approx(0.1)  # a generator of one class: 1/10
    assert metrics.class_kl(only_threes) > 0.9 * np.log(10)  # log(10) when every sample is a 3


def test_noise_is_not_a_covered_class(extractor):
    noise = np.random.default_rng(0).integers(0, 256, (500, 32, 32, 1), dtype=np.uint8)
    _, probabilities = extractor.embed(noise)
    assert metrics.mode_coverage(probabilities) <= 0.2


def test_inception_features_need_their_weights_on_disk(tmp_path, monkeypatch):
    """Without the fid extra (its file is the default) a path is needed, and it must exist."""
    import pipeline.config
    import pipeline.quality

    monkeypatch.setattr(pipeline.config, "default_inception_weights", lambda: None)
    monkeypatch.setattr(pipeline.quality, "default_inception_weights", lambda: None)
    raw = {"data": {"source": "synthetic"}, "eval": {"every": 10}}
    with pytest.raises(ConfigError, match=r"eval.inception_weights .* the `fid` extra"):
        validate(raw)
    missing = tmp_path / "pt_inception.pth"
    with pytest.raises(ConfigError, match=str(missing)):
        make_extractor(validate({**raw, "eval": {"every": 10, "inception_weights": str(missing)}}), tmp_path)
    with pytest.raises(ConfigError, match="eval.extractor='digits'"):
        validate({"data": {"source": "synthetic"}, "eval": {"every": 10, "extractor": "digits"}})


def test_the_fid_noise_is_measured_and_reproducible(labelled, extractor):
    """eval/fid_std on two halves of the real digits: positive, reproducible from its seed, and
    small against the FID of a visibly worse set."""
    images, _ = labelled
    a, _ = extractor.embed(images[0::2])
    b, _ = extractor.embed(images[1::2])
    noisy, _ = extractor.embed(with_noise(images[1::2], 48))
    std = metrics.frechet_distance_std(a, b, resamples=10)
    assert std > 0 and std == metrics.frechet_distance_std(a, b, resamples=10)
    assert metrics.frechet_distance(a, noisy) - metrics.frechet_distance(a, b) > 10 * std
