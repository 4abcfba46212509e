"""critlayers: find the critical layers of a language model from its representations.

The core is a compiled CKA engine (centred kernel alignment, Kornblith et al. 2019,
arXiv:1905.00414) that compares every pair of layers at once; on top of it sit the model
layer (hooks on Hugging Face transformers blocks), the layer scan of Liu et al. 2025
(arXiv:2506.00382) and drop-in replacements for existing CKA libraries
(:mod:`critlayers.compat`).

Example:
    >>> import torch, critlayers as cl
    >>> x = torch.randn(256, 64)
    >>> float(cl.linear_cka(x, x @ torch.linalg.qr(torch.randn(64, 64))[0]))  # doctest: +ELLIPSIS
    1.0...
"""

from .functional import (
    HSIC,
    center_gram,
    cka,
    cka_from_hsic,
    cka_matrix,
    cpu_product_backend,
    feature_space_linear_cka,
    gram_hsic_matrix,
    gram_linear,
    gram_rbf,
    hsic,
    hsic_matrix,
    linear_cka,
    median_sq_distance,
    rbf_cka,
    set_cpu_product_backend,
)
from .minibatch import MinibatchCKA, StreamingLinearCKA

__version__ = "0.1.0"

__all__ = [
    "HSIC",
    "MinibatchCKA",
    "StreamingLinearCKA",
    "center_gram",
    "cka",
    "cka_from_hsic",
    "cka_matrix",
    "cpu_product_backend",
    "feature_space_linear_cka",
    "gram_hsic_matrix",
    "gram_linear",
    "gram_rbf",
    "hsic",
    "hsic_matrix",
    "linear_cka",
    "median_sq_distance",
    "rbf_cka",
    "set_cpu_product_backend",
]
