"""Float64 reference implementation of kernel CKA, written directly from the formulas.

This module is the oracle that every kernel test compares against. It favours clarity over
speed: Gram matrices are formed explicitly, centring uses the textbook expressions, and all
arithmetic is float64. It is deliberately independent of the compiled engine.

Estimators (Kornblith et al. 2019, arXiv:1905.00414; Song et al. 2012, arXiv:0704.2668):

* biased HSIC: ``hsic(K, L) = <H K H, H L H>_F / (n - 1)^2`` with ``H = I - 1 1^T / n``;
* unbiased HSIC (Song et al. 2012, eq. 5), with ``K~``, ``L~`` the Grams with zeroed diagonal::

      hsic_u = [tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n - 1)(n - 2))
                - 2 / (n - 2) * 1^T K~ L~ 1] / (n (n - 3))

* ``CKA(K, L) = hsic(K, L) / sqrt(hsic(K, K) * hsic(L, L))``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "gram_linear",
    "gram_rbf",
    "center_gram",
    "hsic",
    "hsic_song",
    "cka",
    "linear_cka",
    "rbf_cka",
    "feature_space_linear_cka",
    "cka_matrix",
    "median_sq_distance",
]


def _f64(x) -> torch.Tensor:
    return torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float64)


def gram_linear(x) -> torch.Tensor:
    """Linear Gram ``K = x x^T`` of ``x`` (n, d), in float64. Returns (n, n)."""
    x = _f64(x)
    return x @ x.T


def median_sq_distance(x) -> float:
    """Median of all n^2 squared Euclidean distances of the rows of ``x``, zeros included.

    The median of an even count is the mean of the two middle values (as ``numpy.median``).
    """
    x = _f64(x)
    sq = (x * x).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * x @ x.T).clamp_min(0.0)
    return float(np.median(d2.numpy()))


def gram_rbf(x, threshold: float = 1.0, sigma: float | None = None) -> torch.Tensor:
    """RBF Gram ``K_ij = exp(-|x_i - x_j|^2 / (2 sigma^2))`` of ``x`` (n, d), in float64.

    Without ``sigma``, ``sigma^2 = threshold^2 * median`` of the n^2 squared distances (the
    rule of Kornblith et al. 2019, diagonal zeros included).
    """
    x = _f64(x)
    sq = (x * x).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * x @ x.T).clamp_min(0.0)
    if sigma is None:
        sigma2 = threshold**2 * float(np.median(d2.numpy()))
    else:
        sigma2 = float(sigma) ** 2
    return torch.exp(-d2 / (2.0 * sigma2))


def center_gram(k, unbiased: bool = False) -> torch.Tensor:
    """Centre a Gram matrix (n, n): ``H K H`` (biased) or the U-centred Gram (unbiased).

    U-centring (Song et al. 2012; used by Kornblith et al. and Nguyen et al.) zeroes the
    diagonal, subtracts row/column means taken over off-diagonal entries with the corrections
    that make ``<Ku, Lu> / (n (n - 3))`` the unbiased HSIC, and zeroes the diagonal again.
    """
    k = _f64(k).clone()
    n = k.shape[0]
    if not unbiased:
        row = k.mean(1, keepdim=True)
        col = k.mean(0, keepdim=True)
        return k - row - col + k.mean()
    k.fill_diagonal_(0.0)
    means = k.sum(0) / (n - 2)
    means = means - means.sum() / (2 * (n - 1))
    k = k - means[:, None] - means[None, :]
    k.fill_diagonal_(0.0)
    return k


def hsic(k, l, unbiased: bool = False) -> float:
    """HSIC of two Gram matrices (n, n), normalised as in the module docstring."""
    k, l = _f64(k), _f64(l)
    n = k.shape[0]
    inner = float((center_gram(k, unbiased) * center_gram(l, unbiased)).sum())
    return inner / (n * (n - 3)) if unbiased else inner / (n - 1) ** 2


def hsic_song(k, l) -> float:
    """Unbiased HSIC by Song et al. 2012, eq. 5, term by term (an independent check)."""
    k, l = _f64(k).clone(), _f64(l).clone()
    n = k.shape[0]
    k.fill_diagonal_(0.0)
    l.fill_diagonal_(0.0)
    one = torch.ones(n, dtype=torch.float64)
    term1 = float((k * l).sum())
    term2 = float(one @ k @ one) * float(one @ l @ one) / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * float(one @ k @ l @ one)
    return (term1 + term2 - term3) / (n * (n - 3))


def cka(k, l, unbiased: bool = False) -> float:
    """CKA of two Gram matrices; NaN when either self-HSIC is zero (a constant layer)."""
    xy = hsic(k, l, unbiased)
    xx = hsic(k, k, unbiased)
    yy = hsic(l, l, unbiased)
    denom = xx * yy
    if denom == 0.0:
        return float("nan")
    return xy / denom**0.5 if denom > 0 else float("nan")


def _gram(x, kernel: str, threshold: float, sigma: float | None) -> torch.Tensor:
    if kernel == "linear":
        return gram_linear(x)
    if kernel == "rbf":
        return gram_rbf(x, threshold=threshold, sigma=sigma)
    raise ValueError(f"reference._gram: kernel must be 'linear' or 'rbf', got {kernel!r}")


def linear_cka(x, y, unbiased: bool = False) -> float:
    """Linear CKA of features ``x`` (n, d_x) and ``y`` (n, d_y) through explicit Grams."""
    return cka(gram_linear(x), gram_linear(y), unbiased)


def rbf_cka(x, y, threshold: float = 1.0, sigma: float | None = None,
            unbiased: bool = False) -> float:
    """RBF CKA of features ``x`` (n, d_x) and ``y`` (n, d_y) through explicit Grams."""
    return cka(gram_rbf(x, threshold, sigma), gram_rbf(y, threshold, sigma), unbiased)


def feature_space_linear_cka(x, y, unbiased: bool = False) -> float:
    """Linear CKA in the d x d feature-space form.

    Biased: ``|Xc^T Yc|_F^2 / (|Xc^T Xc|_F |Yc^T Yc|_F)`` with column-centred features.
    Unbiased: the Song et al. estimator expanded in features (no n x n matrix is formed).
    """
    x, y = _f64(x), _f64(y)
    if not unbiased:
        xc, yc = x - x.mean(0), y - y.mean(0)
        xy = float(((xc.T @ yc) ** 2).sum())
        xx = float(((xc.T @ xc) ** 2).sum())
        yy = float(((yc.T @ yc) ** 2).sum())
        return xy / (xx * yy) ** 0.5 if xx * yy > 0 else float("nan")

    n = x.shape[0]

    def hsic_u(a, b):
        qa, qb = (a * a).sum(1), (b * b).sum(1)
        sa, sb = a.sum(0), b.sum(0)
        tr = float(((a.T @ b) ** 2).sum()) - float((qa * qb).sum())
        ka = float(sa @ sa) - float(qa.sum())
        kb = float(sb @ sb) - float(qb.sum())
        kl = float(((a @ sa - qa) * (b @ sb - qb)).sum())
        return (tr + ka * kb / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * kl) / (n * (n - 3))

    xy, xx, yy = hsic_u(x, y), hsic_u(x, x), hsic_u(y, y)
    return xy / (xx * yy) ** 0.5 if xx * yy > 0 else float("nan")


def cka_matrix(feats: Sequence, feats_y: Sequence | None = None, kernel: str = "linear",
               unbiased: bool = False, threshold: float = 1.0,
               sigma: float | None = None) -> torch.Tensor:
    """All-pairs CKA, one pair at a time, in float64. Returns (n_x, n_y) (CPU, float64)."""
    grams_x = [_gram(f, kernel, threshold, sigma) for f in feats]
    grams_y = grams_x if feats_y is None else [_gram(f, kernel, threshold, sigma)
                                                for f in feats_y]
    out = torch.empty(len(grams_x), len(grams_y), dtype=torch.float64)
    for a, k in enumerate(grams_x):
        for b, l in enumerate(grams_y):
            out[a, b] = cka(k, l, unbiased)
    return out
