"""Loads the compiled CKA engine and says how to rebuild it when it is missing."""

from __future__ import annotations

import importlib

_REBUILD = (
    "pip install torch==2.13.0 ninja setuptools && "
    "pip install --no-build-isolation -e .  (run in the critlayers checkout)"
)


def load():
    """Imports ``critlayers._C``, which registers the ``torch.ops.critlayers`` ops.

    Raises:
        ImportError: the extension is not built or was built against another torch; the
            message carries the rebuild command.
    """
    try:
        return importlib.import_module("critlayers._C")
    except ImportError as err:
        raise ImportError(
            f"critlayers: the compiled CKA engine (critlayers._C) could not be loaded: {err}. "
            f"Rebuild it against the installed torch with: {_REBUILD}"
        ) from err
