"""Argument checks shared by the public CKA functions.

Every error names the public function, the argument (with the layer index where there is one)
and the value received, and is raised before any work starts.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence

import numpy as np
import torch

Features = torch.Tensor | np.ndarray | Sequence


def as_matrix(fn: str, arg: str, x, *, square: bool = False,
              check_finite: bool = True) -> torch.Tensor:
    """Returns ``x`` as a floating-point 2-D tensor, checking rank, size and finiteness.

    Integer inputs are converted to float64; tensors keep their device, dtype and strides.
    ``check_finite=False`` leaves the NaN/Inf check to the engine, whose first pass over each
    layer detects them at no extra cost (see :func:`engine_errors`).
    """
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{fn}: {arg} must be a tensor or array, got {type(x).__name__}") \
                from err
    if t.dim() != 2:
        raise ValueError(f"{fn}: {arg} must be 2-D, got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{fn}: {arg} is empty (shape {tuple(t.shape)})")
    if square and t.shape[0] != t.shape[1]:
        raise ValueError(f"{fn}: {arg} must be square (n, n), got shape {tuple(t.shape)}")
    if t.is_complex():
        raise ValueError(f"{fn}: {arg} must be real, got dtype {t.dtype}")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    if check_finite and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{fn}: {arg} contains NaN or Inf")
    return t


def as_feature_list(fn: str, arg: str, feats) -> list[torch.Tensor]:
    """Returns a list of (n, d_l) tensors from a sequence of matrices or an (L, n, d) tensor."""
    if isinstance(feats, (torch.Tensor, np.ndarray)):
        t = torch.as_tensor(feats)
        if t.dim() != 3:
            raise ValueError(
                f"{fn}: {arg} as a single tensor must be (n_layers, n, d), got shape "
                f"{tuple(t.shape)}; pass a list for layers of different widths"
            )
        items = list(t.unbind(0))
    elif isinstance(feats, Sequence) and not isinstance(feats, (str, bytes)):
        items = list(feats)
    else:
        raise ValueError(
            f"{fn}: {arg} must be a sequence of (n, d) matrices or an (n_layers, n, d) tensor, "
            f"got {type(feats).__name__}"
        )
    if not items:
        raise ValueError(f"{fn}: {arg} is empty; it needs at least one layer")
    out = [as_matrix(fn, f"{arg}[{i}]", x, check_finite=False) for i, x in enumerate(items)]
    n = out[0].shape[0]
    for i, x in enumerate(out):
        if x.shape[0] != n:
            raise ValueError(
                f"{fn}: {arg}[{i}] has {x.shape[0]} rows but {arg}[0] has {n}; every layer "
                "must hold the same examples in the same order"
            )
        if x.device != out[0].device:
            raise ValueError(f"{fn}: {arg}[{i}] is on {x.device} but {arg}[0] is on "
                             f"{out[0].device}")
    return out


@contextlib.contextmanager
def engine_errors(fn: str, n_x: int | None, has_y: bool):
    """Re-raises an engine ValueError under the public function's name, with the layer index
    of the concatenated list the engine saw (x layers, then y layers) mapped back to the
    caller's argument: ``feats[i]`` or ``feats_y[j]``."""
    try:
        yield
    except ValueError as err:
        message = str(err)

        def rename(match):
            index = int(match.group(1))
            if has_y and n_x is not None and index >= n_x:
                return f"feats_y[{index - n_x}]"
            return f"feats[{index}]"

        message = re.sub(r"feats\[(\d+)\] \(layer \d+\)", rename, message)
        raise ValueError(f"{fn}: {message}") from None


def check_examples(fn: str, n: int, unbiased: bool) -> None:
    """The biased estimator needs n >= 2 examples, the unbiased one n >= 4."""
    if unbiased and n <= 3:
        raise ValueError(f"{fn}: the unbiased estimator needs n > 3 examples, got n = {n}")
    if n < 2:
        raise ValueError(f"{fn}: CKA needs at least 2 examples, got n = {n}")


def check_choice(fn: str, arg: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{fn}: {arg} must be one of {list(choices)}, got {value!r}")


def check_positive(fn: str, arg: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    try:
        ok = float(value) > 0 and np.isfinite(float(value))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{fn}: {arg} must be a positive finite number, got {value!r}")
