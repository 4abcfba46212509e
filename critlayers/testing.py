"""Helpers for testing the CKA engine: devices, dtypes, tolerances and realistic features.

Every kernel test draws its devices, dtypes and tolerances from here, so that one test
function covers the CPU and (when present) CUDA halves alike.
"""

from __future__ import annotations

import torch

__all__ = ["DEVICES", "FLOAT_DTYPES", "cka_tolerance", "make_layers", "as_strided_copy"]

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def cka_tolerance(dtype: torch.dtype) -> float:
    """Absolute tolerance on CKA against the float64 reference fed the same (rounded) input.

    16- and 32-bit inputs are computed in float32 with float64 sums, so they share the float32
    tier; float64 inputs are computed in float64.
    """
    return 1e-10 if dtype == torch.float64 else 1e-5


def make_layers(n_layers: int, n: int, d: int | list[int], *, rank: int = 16,
                offset: float = 3.0, noise: float = 0.5, seed: int = 0,
                dtype: torch.dtype = torch.float32, device: str = "cpu") -> list[torch.Tensor]:
    """Features shaped like real activations: a shared low-rank signal that drifts from layer
    to layer, isotropic noise, and a large common offset (as in a residual stream).

    Returns n_layers tensors (n, d_l).
    """
    g = torch.Generator().manual_seed(seed)
    widths = d if isinstance(d, list) else [d] * n_layers
    signal = torch.randn(n, rank, generator=g, dtype=torch.float64)
    out = []
    for width in widths:
        signal = signal + 0.3 * torch.randn(n, rank, generator=g, dtype=torch.float64)
        mix = torch.randn(rank, width, generator=g, dtype=torch.float64) / rank**0.5
        x = signal @ mix + noise * torch.randn(n, width, generator=g, dtype=torch.float64)
        x = x + offset * torch.randn(width, generator=g, dtype=torch.float64).abs()
        out.append(x.to(dtype=dtype, device=device))
    return out


def as_strided_copy(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``x`` (n, d) in another memory layout: 'contiguous', 'transposed'
    (column-major storage) or 'sliced' (every other column of a wider buffer)."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "transposed":
        return x.T.contiguous().T
    if layout == "sliced":
        wide = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=x.dtype, device=x.device)
        wide[:, ::2] = x
        return wide[:, ::2]
    raise ValueError(f"as_strided_copy: layout must be 'contiguous', 'transposed' or 'sliced', "
                     f"got {layout!r}")
