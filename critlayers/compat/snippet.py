"""Drop-in replacement for the ``CKA`` / ``CudaCKA`` classes of the widely copied CKA snippet.

Many research repositories carry a short file defining two classes with the same six methods:
``CKA`` works on NumPy arrays and returns floats, ``CudaCKA(device)`` works on torch tensors and
returns 0-d tensors. Changing the import moves both onto the critlayers engine::

    from cka import CKA, CudaCKA                        # before (the copied file)
    from critlayers.compat.snippet import CKA, CudaCKA  # after

Conventions of this family, kept here:

* HSIC is the *unnormalised* Frobenius product ``sum(H K H * H L H)``, with
  ``H = I - 1 1^T / n``: it is ``(n - 1)^2`` times the biased HSIC of critlayers. CKA values do not
  depend on the normalisation.
* RBF Grams are ``K_ij = exp(-|x_i - x_j|^2 / (2 sigma^2))``. ``sigma=None`` sets
  ``sigma = sqrt(m)`` with ``m`` the median of the *non-zero* squared distances of that input, so in
  ``kernel_CKA(X, Y)`` each side gets its own bandwidth. ``CKA`` takes the NumPy median (mean of the
  two middle values for an even count); ``CudaCKA`` takes ``torch.median`` (the lower middle
  value). A given ``sigma`` is shared by both sides.
* Only the biased estimator exists in this family.

Note:
    The original built the n x n centring matrix ``H`` and multiplied by it twice (O(n^3) time,
    O(n^2) extra memory); the engine centres in O(n^2). Results differ from the original in these
    documented ways: outputs are float64 (the original kept the input dtype); ``centering`` refuses
    an asymmetric matrix with ``ValueError`` (the original would centre it silently, although every
    HSIC in this family assumes a symmetric Gram); a constant input gives NaN with one
    ``RuntimeWarning`` instead of NumPy's "invalid value" warning; ``rbf`` with ``sigma=None`` on an
    input whose rows are all equal uses ``sigma = 1`` (the Gram is all ones for any bandwidth) where
    the original took the median of an empty set and returned NaN.
"""

from __future__ import annotations

import numpy as np
import torch

import critlayers as cl
from critlayers.compat._common import as_tensor

__all__ = ["CKA", "CudaCKA"]


def _matrix(x, caller: str, name: str) -> torch.Tensor:
    t = as_tensor(x, caller, name)
    if t.dim() != 2:
        raise ValueError(f"{caller}: {name} must be 2-d, got shape {tuple(t.shape)}")
    return t


def _median_bandwidth(x: torch.Tensor, lower_median: bool) -> float:
    """``sqrt`` of the median non-zero squared distance between rows of ``x`` (n, d)."""
    g = cl.gram_linear(x)
    sq = torch.diagonal(g)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * g).flatten()
    d2 = d2[d2 != 0]
    if d2.numel() == 0:
        return 1.0
    if lower_median:
        m = float(torch.median(d2))
    else:
        m = float(np.median(d2.cpu().numpy()))
    return float(np.sqrt(m)) if m > 0 else 1.0


def _n_examples(x: torch.Tensor, y: torch.Tensor, caller: str) -> int:
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{caller}: X and Y must have the same number of examples, got {x.shape[0]} and "
            f"{y.shape[0]}"
        )
    return x.shape[0]


class _SnippetMath:
    """Engine-backed bodies of the six methods; subclasses choose the input and output types."""

    _lower_median = False

    def _centering(self, k) -> torch.Tensor:
        k = _matrix(k, "centering", "K")
        if k.shape[0] != k.shape[1]:
            raise ValueError(f"centering: K must be square, got shape {tuple(k.shape)}")
        return cl.center_gram(k)

    def _rbf(self, x, sigma) -> torch.Tensor:
        x = _matrix(x, "rbf", "X")
        if sigma is None:
            sigma = _median_bandwidth(x, self._lower_median)
        elif not float(sigma) > 0:
            raise ValueError(f"rbf: sigma must be positive or None, got {sigma!r}")
        return cl.gram_rbf(x, sigma=float(sigma))

    def _kernel_grams(self, x, y, sigma, caller: str):
        x, y = _matrix(x, caller, "X"), _matrix(y, caller, "Y")
        n = _n_examples(x, y, caller)
        return self._rbf(x, sigma), self._rbf(y, sigma), n

    def _linear_hsic(self, x, y) -> torch.Tensor:
        x, y = _matrix(x, "linear_HSIC", "X"), _matrix(y, "linear_HSIC", "Y")
        n = _n_examples(x, y, "linear_HSIC")
        return cl.hsic(cl.gram_linear(x), cl.gram_linear(y)) * (n - 1) ** 2

    def _kernel_hsic(self, x, y, sigma) -> torch.Tensor:
        k, l, n = self._kernel_grams(x, y, sigma, "kernel_HSIC")  # noqa: E741
        return cl.hsic(k, l) * (n - 1) ** 2

    def _linear_cka(self, x, y) -> torch.Tensor:
        x, y = _matrix(x, "linear_CKA", "X"), _matrix(y, "linear_CKA", "Y")
        _n_examples(x, y, "linear_CKA")
        return cl.linear_cka(x, y)

    def _kernel_cka(self, x, y, sigma) -> torch.Tensor:
        k, l, _ = self._kernel_grams(x, y, sigma, "kernel_CKA")  # noqa: E741
        return cl.cka(k, l)


class CKA(_SnippetMath):
    """Biased linear and RBF CKA on NumPy arrays (arXiv:1905.00414).

    Every method accepts NumPy arrays (or anything ``numpy.asarray`` reads, torch tensors included)
    and returns a float64 NumPy array (``centering``, ``rbf``) or a Python float (HSIC and CKA).
    """

    def centering(self, K) -> np.ndarray:
        """Double-centre a symmetric Gram matrix: ``H K H``, shape (n, n)."""
        return self._centering(K).cpu().numpy()

    def rbf(self, X, sigma=None) -> np.ndarray:
        """RBF Gram of ``X`` (n, d), shape (n, n); ``sigma=None`` takes the median rule above."""
        return self._rbf(X, sigma).cpu().numpy()

    def kernel_HSIC(self, X, Y, sigma) -> float:
        """Unnormalised RBF HSIC ``sum(H K H * H L H)`` of ``X`` (n, d_x) and ``Y`` (n, d_y)."""
        return float(self._kernel_hsic(X, Y, sigma))

    def linear_HSIC(self, X, Y) -> float:
        """Unnormalised linear HSIC ``sum(H X X^T H * H Y Y^T H)``."""
        return float(self._linear_hsic(X, Y))

    def linear_CKA(self, X, Y) -> float:
        """Linear CKA ``HSIC(X, Y) / sqrt(HSIC(X, X) HSIC(Y, Y))``; NaN for a constant input."""
        return float(self._linear_cka(X, Y))

    def kernel_CKA(self, X, Y, sigma=None) -> float:
        """RBF CKA; ``sigma=None`` gives each input its own median bandwidth."""
        return float(self._kernel_cka(X, Y, sigma))


class CudaCKA(_SnippetMath):
    """Biased linear and RBF CKA on torch tensors, results on ``device`` (arXiv:1905.00414).

    Args:
        device: where results are returned, as in the original class (``"cuda"``, ``"cpu"``, a
            ``torch.device``). The engine runs on the device of the inputs.

    Every method takes tensors (NumPy arrays are accepted too) and returns float64 tensors on
    ``device``: (n, n) for ``centering`` and ``rbf``, 0-d for HSIC and CKA.
    """

    _lower_median = True

    def __init__(self, device) -> None:
        self.device = torch.device(device)

    def centering(self, K) -> torch.Tensor:
        """Double-centre a symmetric Gram matrix: ``H K H``, shape (n, n)."""
        return self._centering(K).to(self.device)

    def rbf(self, X, sigma=None) -> torch.Tensor:
        """RBF Gram of ``X`` (n, d), shape (n, n); ``sigma=None`` takes the median rule above."""
        return self._rbf(X, sigma).to(self.device)

    def kernel_HSIC(self, X, Y, sigma) -> torch.Tensor:
        """Unnormalised RBF HSIC ``sum(H K H * H L H)``, a 0-d tensor."""
        return self._kernel_hsic(X, Y, sigma).to(self.device)

    def linear_HSIC(self, X, Y) -> torch.Tensor:
        """Unnormalised linear HSIC ``sum(H X X^T H * H Y Y^T H)``, a 0-d tensor."""
        return self._linear_hsic(X, Y).to(self.device)

    def linear_CKA(self, X, Y) -> torch.Tensor:
        """Linear CKA, a 0-d tensor; NaN for a constant input."""
        return self._linear_cka(X, Y).to(self.device)

    def kernel_CKA(self, X, Y, sigma=None) -> torch.Tensor:
        """RBF CKA, a 0-d tensor; ``sigma=None`` gives each input its own median bandwidth."""
        return self._kernel_cka(X, Y, sigma).to(self.device)
