"""Drop-in replacement for the NumPy CKA module of Kornblith et al. (2019).

The reference implementation that accompanies "Similarity of Neural Network Representations
Revisited" (arXiv:1905.00414) is a single NumPy file that most users copy next to their code and
import as ``cka``. Changing one line moves that code onto the critlayers engine::

    import cka                                      # before
    from critlayers.compat import kornblith as cka  # after

The five public functions keep their names, arguments, defaults and return kinds: NumPy arrays or
array-likes in, NumPy arrays (Gram matrices) or Python floats (CKA values) out.

Estimators, with ``H = I - 1 1^T / n`` and ``n`` examples:

* biased: ``CKA = <H K H, H L H>_F / (|H K H|_F |H L H|_F)``;
* debiased: the same ratio with each Gram U-centred (Song et al. 2012, arXiv:0704.2668), which
  turns every inner product into ``n (n - 3)`` times the unbiased HSIC.

Note:
    Results differ from the original in two documented ways. All outputs are float64, whereas the
    original kept the input dtype (a float32 Gram of float32 features). A constant representation
    gives NaN with one ``RuntimeWarning`` from the engine, where the original divided zero by zero
    and emitted NumPy's "invalid value" warning; the value is NaN in both.
"""

from __future__ import annotations

import numpy as np

import critlayers as cl
from critlayers.compat._common import as_tensor

__all__ = ["gram_linear", "gram_rbf", "center_gram", "cka", "feature_space_linear_cka"]


def _matrix(x, caller: str, name: str):
    t = as_tensor(x, caller, name)
    if t.dim() != 2:
        raise ValueError(f"{caller}: {name} must be 2-d, got shape {tuple(t.shape)}")
    return t


def gram_linear(x) -> np.ndarray:
    """Linear kernel Gram matrix.

    Args:
        x: features, shape (n, d).

    Returns:
        ``K = x x^T``, shape (n, n), float64 NumPy array.
    """
    return cl.gram_linear(_matrix(x, "gram_linear", "x")).cpu().numpy()


def gram_rbf(x, threshold: float = 1.0) -> np.ndarray:
    """RBF kernel Gram matrix with a median-distance bandwidth.

    ``K_ij = exp(-|x_i - x_j|^2 / (2 sigma^2))`` with ``sigma^2 = threshold^2 * m``, where ``m`` is
    the median of all ``n^2`` squared distances (the ``n`` zeros on the diagonal included).

    Args:
        x: features, shape (n, d).
        threshold: bandwidth as a fraction of the median distance.

    Returns:
        Gram matrix, shape (n, n), float64 NumPy array.

    Raises:
        ValueError: if ``threshold`` is not positive.
    """
    if not threshold > 0:
        raise ValueError(f"gram_rbf: threshold must be positive, got {threshold!r}")
    return cl.gram_rbf(_matrix(x, "gram_rbf", "x"), threshold=float(threshold)).cpu().numpy()


def center_gram(gram, unbiased: bool = False) -> np.ndarray:
    """Centre a symmetric Gram matrix.

    Biased: ``H K H``. Unbiased: the U-centred Gram of Song et al. (2012), whose Frobenius inner
    products are ``n (n - 3)`` times the unbiased HSIC. The input is not modified.

    Args:
        gram: symmetric Gram matrix, shape (n, n).
        unbiased: U-centre instead of double-centre.

    Returns:
        Centred copy, shape (n, n), float64 NumPy array.

    Raises:
        ValueError: if ``gram`` is not square or not symmetric.
    """
    k = _matrix(gram, "center_gram", "gram")
    if k.shape[0] != k.shape[1]:
        raise ValueError(f"center_gram: gram must be square, got shape {tuple(k.shape)}")
    return cl.center_gram(k, unbiased=bool(unbiased)).cpu().numpy()


def cka(gram_x, gram_y, debiased: bool = False) -> float:
    """CKA of two Gram matrices.

    ``CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` with the biased HSIC, or the unbiased one
    when ``debiased`` is set.

    Args:
        gram_x: Gram matrix of the first representation, shape (n, n).
        gram_y: Gram matrix of the second representation, shape (n, n).
        debiased: use the unbiased HSIC estimator (needs n > 3).

    Returns:
        The CKA value as a Python float (NaN for a constant representation).
    """
    k = _matrix(gram_x, "cka", "gram_x")
    l = _matrix(gram_y, "cka", "gram_y")  # noqa: E741
    if k.shape != l.shape:
        raise ValueError(
            f"cka: gram_x and gram_y must have the same shape, got {tuple(k.shape)} and "
            f"{tuple(l.shape)}"
        )
    return float(cl.cka(k, l, unbiased=bool(debiased)))


def feature_space_linear_cka(features_x, features_y, debiased: bool = False) -> float:
    """Linear CKA computed from features, without forming n x n Gram matrices.

    Equal to ``cka(gram_linear(features_x), gram_linear(features_y), debiased)``; the biased form is
    ``|X_c^T Y_c|_F^2 / (|X_c^T X_c|_F |Y_c^T Y_c|_F)`` with column-centred ``X_c``, ``Y_c``.

    Args:
        features_x: shape (n, d_x).
        features_y: shape (n, d_y).
        debiased: use the unbiased HSIC estimator (needs n > 3).

    Returns:
        The CKA value as a Python float (NaN for a constant representation).
    """
    x = _matrix(features_x, "feature_space_linear_cka", "features_x")
    y = _matrix(features_y, "feature_space_linear_cka", "features_y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            "feature_space_linear_cka: features_x and features_y must have the same number of "
            f"examples, got {x.shape[0]} and {y.shape[0]}"
        )
    return float(cl.feature_space_linear_cka(x, y, unbiased=bool(debiased)))
