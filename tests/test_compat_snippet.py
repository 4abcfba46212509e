"""critlayers.compat.snippet (the CKA / CudaCKA classes) against textbook formulas.

The original classes are not a package; the oracle here restates their math directly: the n x n
centring matrix, the unnormalised HSIC ``sum(HKH * HLH)``, and the median-of-non-zero bandwidth.
"""

import numpy as np
import pytest
import torch

from critlayers import reference as ref
from critlayers.compat.snippet import CKA, CudaCKA


def _features(n, d, seed, rank=4):
    rng = np.random.default_rng(seed)
    low = rng.standard_normal((n, rank)) @ rng.standard_normal((rank, d))
    return low + 0.3 * rng.standard_normal((n, d)) + 1.0


def _hkh(k):
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return h @ k @ h


def _sq_dist(x):
    g = x @ x.T
    return np.diag(g)[:, None] + np.diag(g)[None, :] - 2 * g


def _rbf(x, sigma):
    return np.exp(-_sq_dist(x) / (2 * sigma**2))


def _median_sigma(x, lower):
    d2 = _sq_dist(x)
    np.fill_diagonal(d2, 0.0)
    values = np.sort(d2[d2 != 0])
    m = values[(len(values) - 1) // 2] if lower else np.median(values)
    return np.sqrt(m)


def _cka(k, l):  # noqa: E741
    hk, hl = _hkh(k), _hkh(l)
    return np.sum(hk * hl) / np.sqrt(np.sum(hk * hk) * np.sum(hl * hl))


@pytest.fixture(scope="module")
def pair():
    x = _features(30, 20, 0)
    y = np.maximum(x @ np.random.default_rng(1).standard_normal((20, 12)), 0) + _features(30, 12, 2)
    return x, y


def test_numpy_class_linear(pair):
    x, y = pair
    c = CKA()
    hsic = c.linear_HSIC(x, y)
    assert type(hsic) is float
    assert hsic == pytest.approx(np.sum(_hkh(x @ x.T) * _hkh(y @ y.T)), rel=1e-10)
    assert c.linear_CKA(x, y) == pytest.approx(_cka(x @ x.T, y @ y.T), abs=1e-10)
    assert c.linear_CKA(x, y) == pytest.approx(ref.linear_cka(x, y), abs=1e-10)
    np.testing.assert_allclose(c.centering(x @ x.T), _hkh(x @ x.T), atol=1e-9)


def test_numpy_class_rbf_median_rule(pair):
    x, y = pair
    c = CKA()
    sx, sy = _median_sigma(x, lower=False), _median_sigma(y, lower=False)
    np.testing.assert_allclose(c.rbf(x), _rbf(x, sx), rtol=1e-9, atol=1e-12)
    assert c.kernel_CKA(x, y) == pytest.approx(_cka(_rbf(x, sx), _rbf(y, sy)), abs=1e-9)
    assert c.kernel_HSIC(x, y, 3.0) == pytest.approx(
        np.sum(_hkh(_rbf(x, 3.0)) * _hkh(_rbf(y, 3.0))), rel=1e-9)
    assert c.kernel_CKA(x, y, sigma=3.0) == pytest.approx(_cka(_rbf(x, 3.0), _rbf(y, 3.0)),
                                                         abs=1e-9)


def test_torch_class_types_device_and_lower_median(pair):
    x, y = (torch.tensor(a, dtype=torch.float32) for a in pair)
    c = CudaCKA("cpu")
    out = c.kernel_CKA(x, y)
    assert isinstance(out, torch.Tensor) and out.dim() == 0 and out.device.type == "cpu"
    xs, ys = (a.double().numpy() for a in (x, y))
    sx, sy = _median_sigma(xs, lower=True), _median_sigma(ys, lower=True)
    assert float(out) == pytest.approx(_cka(_rbf(xs, sx), _rbf(ys, sy)), abs=1e-5)
    assert float(c.linear_CKA(x, y)) == pytest.approx(_cka(xs @ xs.T, ys @ ys.T), abs=1e-5)
    assert float(c.linear_HSIC(x, y)) == pytest.approx(
        np.sum(_hkh(xs @ xs.T) * _hkh(ys @ ys.T)), rel=1e-5)
    assert c.rbf(x).shape == (30, 30) and c.centering(x @ x.T).shape == (30, 30)


def test_cka_of_itself_is_one_and_constant_is_nan(pair):
    x, _ = pair
    c = CKA()
    assert c.linear_CKA(x, x) == pytest.approx(1.0, abs=1e-12)
    assert c.kernel_CKA(x, x) == pytest.approx(1.0, abs=1e-12)
    with pytest.warns(RuntimeWarning):
        assert np.isnan(c.linear_CKA(x, np.ones((30, 4))))
    with pytest.warns(RuntimeWarning):
        assert np.isnan(c.kernel_CKA(x, np.ones((30, 4))))


def test_errors_name_method_and_argument():
    c = CKA()
    with pytest.raises(ValueError, match="linear_CKA: X and Y"):
        c.linear_CKA(np.ones((5, 2)), np.ones((6, 2)))
    with pytest.raises(ValueError, match="rbf: sigma"):
        c.rbf(np.ones((5, 2)), sigma=0.0)
