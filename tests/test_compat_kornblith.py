"""critlayers.compat.kornblith against the float64 reference (the original is NumPy-only)."""

import numpy as np
import pytest

from critlayers import reference as ref
from critlayers.compat import kornblith as cka


def _features(n, d, seed, rank=4, dtype=np.float64):
    rng = np.random.default_rng(seed)
    low = rng.standard_normal((n, rank)) @ rng.standard_normal((rank, d))
    return (low + 0.3 * rng.standard_normal((n, d)) + 2.0).astype(dtype)


@pytest.fixture(scope="module")
def pair():
    x = _features(40, 24, 0)
    y = np.tanh(x @ np.random.default_rng(1).standard_normal((24, 16))) + _features(40, 16, 2)
    return x, y


def test_gram_linear_matches_reference(pair):
    x, _ = pair
    out = cka.gram_linear(x)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64 and out.shape == (40, 40)
    np.testing.assert_allclose(out, ref.gram_linear(x).numpy(), rtol=1e-12)


@pytest.mark.parametrize("threshold", [0.5, 1.0, 2.0])
def test_gram_rbf_matches_reference(pair, threshold):
    x, _ = pair
    np.testing.assert_allclose(cka.gram_rbf(x, threshold), ref.gram_rbf(x, threshold).numpy(),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("unbiased", [False, True])
def test_center_gram_matches_reference_and_copies(pair, unbiased):
    x, _ = pair
    gram = cka.gram_linear(x)
    before = gram.copy()
    out = cka.center_gram(gram, unbiased=unbiased)
    np.testing.assert_array_equal(gram, before)
    np.testing.assert_allclose(out, ref.center_gram(gram, unbiased).numpy(), rtol=1e-9,
                               atol=1e-9 * np.abs(gram).max())


def test_center_gram_rejects_asymmetric():
    gram = np.arange(16.0).reshape(4, 4)
    with pytest.raises(ValueError, match="symmetric"):
        cka.center_gram(gram)


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_cka_matches_reference(pair, debiased, kernel):
    x, y = pair
    gram = cka.gram_linear if kernel == "linear" else cka.gram_rbf
    out = cka.cka(gram(x), gram(y), debiased=debiased)
    assert type(out) is float
    ref_gram = ref.gram_linear if kernel == "linear" else ref.gram_rbf
    assert out == pytest.approx(ref.cka(ref_gram(x), ref_gram(y), debiased), abs=1e-10)


@pytest.mark.parametrize("debiased", [False, True])
def test_feature_space_equals_gram_form_on_float32(pair, debiased):
    x, y = (a.astype(np.float32) for a in pair)
    out = cka.feature_space_linear_cka(x, y, debiased=debiased)
    assert type(out) is float
    expected = ref.cka(ref.gram_linear(x), ref.gram_linear(y), debiased)
    assert out == pytest.approx(expected, abs=1e-5)


def test_biased_inflated_debiased_near_zero_for_independent_wide_data():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((32, 512)), rng.standard_normal((32, 512))
    assert cka.feature_space_linear_cka(x, y) > 0.9
    assert abs(cka.feature_space_linear_cka(x, y, debiased=True)) < 0.15


def test_constant_representation_gives_nan_with_warning(pair):
    x, _ = pair
    const = np.ones((40, 3))
    with pytest.warns(RuntimeWarning):
        assert np.isnan(cka.cka(cka.gram_linear(x), cka.gram_linear(const)))


def test_shape_errors_name_function_and_argument():
    with pytest.raises(ValueError, match="feature_space_linear_cka: features_x"):
        cka.feature_space_linear_cka(np.ones((5, 2)), np.ones((6, 2)))
    with pytest.raises(ValueError, match="cka: gram_x"):
        cka.cka(np.eye(5), np.eye(6))
