"""Drop-in replacements for existing CKA code, computed by the critlayers engine.

One module per family keeps that family's public names, arguments, defaults, orientation and
return types, so migrating is a one-line import change:

============================  ================================================================
module                        replaces
============================  ================================================================
``compat.kornblith``          the NumPy ``cka`` module of Kornblith et al. 2019
``compat.snippet``            the ``CKA`` / ``CudaCKA`` classes of the common CKA snippet
``compat.nguyen``             ``MinibatchCKA`` of Nguyen et al. 2021 (TensorFlow)
``compat.pytorch_cka``        the ``pytorch-cka`` package (``import cka``)
``compat.torch_cka``          the ``torch_cka`` package (PyTorch-Model-Compare)
``compat.ckatorch``           the functional API of the ``ckatorch`` package
============================  ================================================================

Where an original has a bug, the replacement follows the original's documented intent and its
module docstring says where the numbers differ and why. Modules are imported on first access.
"""

from __future__ import annotations

import importlib

__all__ = ["kornblith", "snippet", "nguyen", "pytorch_cka", "torch_cka", "ckatorch"]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
