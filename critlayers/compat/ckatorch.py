"""Drop-in replacement for the functional API of the ``ckatorch`` package.

``ckatorch`` ports the NumPy code of Kornblith et al. (arXiv:1905.00414) to torch and adds the
minibatch estimator of Nguyen et al. (arXiv:2010.15327). Changing the import moves its functions
onto the critlayers engine::

    from ckatorch import cka_base, cka_batch                      # before
    from critlayers.compat.ckatorch import cka_base, cka_batch    # after

All functions take torch tensors (NumPy arrays are accepted) and return float64 tensors, like the
package, which cast its inputs to float64.

Note:
    Results differ from the package where it departs from its own documentation:

    * ``cka_base(..., method="hsic")`` ignored ``unbiased`` and always returned the biased value,
      although the package documents that ``method`` does not influence the output. Here both
      methods honour ``unbiased`` and return the same number.
    * ``rbf_kernel`` took ``torch.median`` of the ``n^2`` squared distances, the lower of the two
      middle values when ``n`` is even, while the Kornblith rule it ports takes their mean. Here
      ``sigma^2 = threshold^2 * median`` with the mean of the middle pair, so RBF results match the
      package exactly for odd ``n`` and differ slightly for even ``n``.
    * ``hsic0`` accepted an asymmetric matrix unless *both* were asymmetric; here either one being
      asymmetric raises ``ValueError``.
    * The unbiased estimators raise ``ValueError`` for ``n <= 3`` examples, where the package
      divided by zero; a constant representation gives NaN with one ``RuntimeWarning``.
"""

from __future__ import annotations

from typing import Literal

import torch

import critlayers as cl
from critlayers.compat._common import as_tensor

__all__ = [
    "cka_base",
    "cka_batch",
    "center_gram_matrix",
    "hsic0",
    "hsic1",
    "linear_kernel",
    "rbf_kernel",
]


def _tensor(x, caller: str, name: str, dim: int) -> torch.Tensor:
    t = as_tensor(x, caller, name)
    if t.dim() != dim:
        raise ValueError(f"{caller}: {name} must be {dim}-d, got shape {tuple(t.shape)}")
    return t


def _check_unbiased_n(n: int, caller: str) -> None:
    if n <= 3:
        raise ValueError(f"{caller}: the unbiased HSIC needs more than 3 examples, got n={n}")


def linear_kernel(x) -> torch.Tensor:
    """Linear Gram ``K = x x^T`` of ``x`` (n, m); returns (n, n) float64."""
    return cl.gram_linear(_tensor(x, "linear_kernel", "x", 2))


def rbf_kernel(x, threshold: float = 1.0) -> torch.Tensor:
    """RBF Gram of ``x`` (n, m): ``exp(-d_ij^2 / (2 threshold^2 median(d^2)))``; returns (n, n).

    The median runs over all ``n^2`` squared distances, diagonal zeros included (mean of the middle
    pair for an even count; see the module Note).

    Raises:
        ValueError: if ``threshold`` is not positive.
    """
    if not threshold > 0:
        raise ValueError(f"rbf_kernel: threshold must be positive, got {threshold!r}")
    return cl.gram_rbf(_tensor(x, "rbf_kernel", "x", 2), threshold=float(threshold))


def center_gram_matrix(gram_matrix, unbiased: bool = False) -> torch.Tensor:
    """Centre a symmetric Gram (n, n): ``H K H``, or U-centre it when ``unbiased``.

    Raises:
        ValueError: if ``gram_matrix`` is not symmetric.
    """
    return cl.center_gram(_tensor(gram_matrix, "center_gram_matrix", "gram_matrix", 2),
                          unbiased=bool(unbiased))


def hsic0(gram_x, gram_y) -> torch.Tensor:
    """Biased HSIC ``<H K H, H L H>_F / (n - 1)^2`` of two symmetric Grams (n, n); 0-d float64.

    Raises:
        ValueError: if either matrix is asymmetric or the shapes differ.
    """
    k = _tensor(gram_x, "hsic0", "gram_x", 2)
    l = _tensor(gram_y, "hsic0", "gram_y", 2)  # noqa: E741
    if k.shape != l.shape:
        raise ValueError(f"hsic0: gram_x and gram_y must have one shape, got {tuple(k.shape)} "
                         f"and {tuple(l.shape)}")
    for name, g in (("gram_x", k), ("gram_y", l)):
        if not torch.allclose(g, g.T):
            raise ValueError(f"hsic0: {name} must be symmetric")
    return cl.hsic(k, l)


def hsic1(gram_x, gram_y) -> torch.Tensor:
    """Unbiased HSIC (Song et al. 2012) of each pair in two batches of Grams (bsz, n, n).

    Returns:
        float64 tensor of shape (bsz,).

    Raises:
        ValueError: if the inputs are not 3-d of one shape, or ``n <= 3``.
    """
    gx = _tensor(gram_x, "hsic1", "gram_x", 3)
    gy = _tensor(gram_y, "hsic1", "gram_y", 3)
    if gx.shape != gy.shape:
        raise ValueError(f"hsic1: gram_x and gram_y must have one shape, got {tuple(gx.shape)} "
                         f"and {tuple(gy.shape)}")
    _check_unbiased_n(gx.shape[-1], "hsic1")
    return torch.stack([cl.hsic(kb, lb, unbiased=True) for kb, lb in zip(gx, gy, strict=True)])


def cka_base(
    x,
    y,
    kernel: Literal["linear", "rbf"] = "linear",
    unbiased: bool = False,
    threshold: float = 1.0,
    method: Literal["fro_norm", "hsic"] = "fro_norm",
) -> torch.Tensor:
    """CKA of two feature matrices, ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))``.

    Args:
        x: features, shape (n, j).
        y: features, shape (n, k).
        kernel: ``"linear"`` or ``"rbf"`` (median-distance bandwidth scaled by ``threshold``).
        unbiased: use the unbiased HSIC (needs n > 3).
        threshold: RBF bandwidth as a fraction of the median distance.
        method: ``"fro_norm"`` or ``"hsic"``; both compute the same number.

    Returns:
        0-d float64 tensor; in [0, 1] for the biased estimator, NaN for a constant input.

    Raises:
        ValueError: for an unknown ``kernel`` or ``method``, or mismatched example counts.
    """
    if kernel not in ("linear", "rbf"):
        raise ValueError(f"cka_base: kernel must be 'linear' or 'rbf', got {kernel!r}")
    if method not in ("fro_norm", "hsic"):
        raise ValueError(f"cka_base: method must be 'fro_norm' or 'hsic', got {method!r}")
    x = _tensor(x, "cka_base", "x", 2)
    y = _tensor(y, "cka_base", "y", 2)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"cka_base: x and y must have the same number of examples, got "
                         f"{x.shape[0]} and {y.shape[0]}")
    if unbiased:
        _check_unbiased_n(x.shape[0], "cka_base")
    if kernel == "linear":
        return cl.linear_cka(x, y, unbiased=bool(unbiased))
    return cl.rbf_cka(x, y, threshold=float(threshold), unbiased=bool(unbiased))


def cka_batch(x, y) -> torch.Tensor:
    """Minibatch linear CKA of Nguyen et al. over a stack of batches.

    ``CKA = sum_b HSIC_u(K_b, L_b) / sqrt(sum_b HSIC_u(K_b, K_b) * sum_b HSIC_u(L_b, L_b))`` with
    ``K_b = x_b x_b^T``, ``L_b = y_b y_b^T`` and the unbiased HSIC of Song et al. (2012).

    Args:
        x: shape (bsz, n, j): ``bsz`` batches of ``n`` examples.
        y: shape (bsz, n, k): the same examples seen by the other representation.

    Returns:
        0-d float64 tensor.

    Raises:
        ValueError: if the inputs are not 3-d, disagree on (bsz, n), or ``n <= 3``.
    """
    x = _tensor(x, "cka_batch", "x", 3)
    y = _tensor(y, "cka_batch", "y", 3)
    if x.shape[:2] != y.shape[:2]:
        raise ValueError(f"cka_batch: x and y must agree on (bsz, n), got {tuple(x.shape[:2])} "
                         f"and {tuple(y.shape[:2])}")
    _check_unbiased_n(x.shape[1], "cka_batch")
    state = cl.MinibatchCKA(1, 1, unbiased=True)
    for xb, yb in zip(x, y, strict=True):
        state.update([xb], [yb])
    return state.compute()[0, 0]
