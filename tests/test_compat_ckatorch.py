"""critlayers.compat.ckatorch against the real ckatorch package (and cka-pytorch's hsic1)."""

import numpy as np
import pytest
import torch

from critlayers import reference as ref
from critlayers.compat import ckatorch as shim

peer = pytest.importorskip("ckatorch", reason="the ckatorch package is not installed")


def _features(n, d, seed, rank=4):
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, rank, generator=g, dtype=torch.float64) @ torch.randn(
        rank, d, generator=g, dtype=torch.float64)
    return low + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64) + 1.0


def _pair(n, seed=0):
    x = _features(n, 24, seed)
    w = torch.randn(24, 16, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return x, torch.tanh(x @ w) + _features(n, 16, seed + 2)


@pytest.mark.parametrize("method", ["fro_norm", "hsic"])
@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_base_linear_matches_peer(method, unbiased):
    x, y = _pair(33)
    ours = shim.cka_base(x, y, unbiased=unbiased, method=method)
    assert isinstance(ours, torch.Tensor) and ours.dim() == 0 and ours.dtype == torch.float64
    if method == "hsic" and unbiased:
        # Documented difference: the peer ignores `unbiased` with method="hsic".
        assert float(peer.cka_base(x, y, unbiased=True, method="hsic")) == pytest.approx(
            float(shim.cka_base(x, y, unbiased=False)), abs=1e-10)
        expected = peer.cka_base(x, y, unbiased=True, method="fro_norm")
    else:
        expected = peer.cka_base(x, y, unbiased=unbiased, method=method)
    assert float(ours) == pytest.approx(float(expected), abs=1e-5)


@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_base_rbf_odd_n_matches_peer(unbiased):
    x, y = _pair(31)
    for threshold in (0.5, 1.0):
        ours = shim.cka_base(x, y, kernel="rbf", threshold=threshold, unbiased=unbiased)
        theirs = peer.cka_base(x, y, kernel="rbf", threshold=threshold, unbiased=unbiased)
        assert float(ours) == pytest.approx(float(theirs), abs=1e-5)


def test_cka_base_rbf_even_n_is_the_documented_median_difference():
    x, y = _pair(30)

    def lower_median_sigma(a):
        d2 = torch.cdist(a, a) ** 2
        return float(torch.median(d2)) ** 0.5

    ours = float(shim.cka_base(x, y, kernel="rbf"))
    theirs = float(peer.cka_base(x, y, kernel="rbf"))
    assert ours == pytest.approx(ref.rbf_cka(x, y), abs=1e-10)
    k = ref.gram_rbf(x, sigma=lower_median_sigma(x))
    l = ref.gram_rbf(y, sigma=lower_median_sigma(y))  # noqa: E741
    assert theirs == pytest.approx(ref.cka(k, l), abs=1e-6)


def test_cka_batch_matches_peer():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 12, 20, generator=g, dtype=torch.float64) + 0.5
    y = torch.relu(x @ torch.randn(20, 9, generator=g, dtype=torch.float64)) + 0.2 * torch.randn(
        6, 12, 9, generator=g, dtype=torch.float64)
    ours = shim.cka_batch(x, y)
    assert ours.dim() == 0
    assert float(ours) == pytest.approx(float(peer.cka_batch(x, y)), abs=1e-5)
    assert float(shim.cka_batch(x[:1], y[:1])) == pytest.approx(
        ref.linear_cka(x[0], y[0], unbiased=True), abs=1e-10)


def test_kernels_centring_and_hsic_match_peer():
    x, y = _pair(31)
    torch.testing.assert_close(shim.linear_kernel(x), peer.linear_kernel(x))
    torch.testing.assert_close(shim.rbf_kernel(x, 0.7), peer.rbf_kernel(x, 0.7))
    k, l = peer.linear_kernel(x), peer.linear_kernel(y)  # noqa: E741
    for unbiased in (False, True):
        torch.testing.assert_close(shim.center_gram_matrix(k, unbiased),
                                   peer.center_gram_matrix(k, unbiased))
    assert float(shim.hsic0(k, l)) == pytest.approx(float(peer.hsic0(k, l)), rel=1e-8)
    gx, gy = torch.stack([k, l, k]), torch.stack([l, l, k])
    torch.testing.assert_close(shim.hsic1(gx, gy), peer.hsic1(gx, gy), rtol=1e-8, atol=0)


def test_hsic1_matches_cka_pytorch():
    other = pytest.importorskip("cka_pytorch.hsic", reason="cka-pytorch (and lightning) missing")
    x, y = _pair(20)
    gx = torch.stack([x @ x.T, y @ y.T])
    gy = torch.stack([y @ y.T, y @ y.T])
    torch.testing.assert_close(shim.hsic1(gx, gy), other.hsic1(gx, gy), rtol=1e-8, atol=0)


def test_fixed_bugs_and_errors():
    x, y = _pair(10)
    asym = torch.arange(100.0, dtype=torch.float64).reshape(10, 10)
    sym = x @ x.T
    with pytest.raises(ValueError, match="hsic0: gram_y must be symmetric"):
        shim.hsic0(sym, asym)
    with pytest.raises(ValueError, match="cka_base: kernel"):
        shim.cka_base(x, y, kernel="poly")
    with pytest.raises(ValueError, match="cka_base: method"):
        shim.cka_base(x, y, method="trace")
    with pytest.raises(ValueError, match="cka_batch: the unbiased HSIC"):
        shim.cka_batch(x[None, :3], y[None, :3])
    with pytest.warns(RuntimeWarning):
        assert torch.isnan(shim.cka_base(x, torch.ones(10, 3, dtype=torch.float64)))
    assert float(shim.cka_base(x, x)) == pytest.approx(1.0, abs=1e-12)
    assert float(shim.cka_base(x.numpy(), y.numpy())) == pytest.approx(
        float(peer.cka_base(x, y)), abs=1e-10)
    assert np.isfinite(float(shim.cka_base(x.float(), y.float(), unbiased=True)))


def test_inputs_are_left_unchanged():
    x, y = _pair(20)
    x0, y0 = x.clone(), y.clone()
    shim.cka_base(x, y)
    shim.cka_base(x, y, unbiased=True)
    shim.cka_base(x, y, kernel="rbf")
    shim.cka_batch(x[None], y[None])
    torch.testing.assert_close(x, x0, rtol=0, atol=0)
    torch.testing.assert_close(y, y0, rtol=0, atol=0)
