"""The CKA engine's benchmark cells: workloads, the implementations compared, and probes.

Implementations, all computing the all-pairs CKA matrix of one workload:

* ``critlayers``: :func:`critlayers.cka_matrix` (biased or unbiased);
* ``floor``: the n_layers Gram products ``x @ x.T`` alone, which any Gram-based method pays;
* ``floor-onednn``: the same products through torch's oneDNN linear op, the library the engine
  itself uses for its CPU float32 products when torch has it (on some CPUs faster than the
  BLAS behind ``x @ x.T``), so that the engine's gain over the floor can be told apart from the
  choice of library;
* ``stacked``: the stacked-Gram formulation used by pytorch-cka: all Grams (n_layers, n, n)
  in float32, U-centred, flattened, one matrix product for all HSIC pairs;
* ``authors``: the pattern of the paper's code: one call per layer pair, each recomputing both
  Grams and centring them with an explicit n x n matrix H (O(n^3) per pair).

Run one cell's peak memory in a fresh process with ``python -m benchmarks.engine_cells
WORKLOAD IMPL ESTIMATOR``: it prints the extra resident memory of the call (RSS sampled every
2 ms during the call, minus the RSS before it; inputs excluded).
"""

from __future__ import annotations

import json
import sys

import torch

import critlayers as cl
from benchmarks.memory import PeakRSS
from benchmarks.peers.workloads import ENGINE_WORKLOADS, layer_features
from critlayers import reference as ref

# The exact large-n case: 18 layers of width 640 and 50 000 tokens.
LARGE = (18, 50_000, 640)


def features(workload: str) -> list[torch.Tensor]:
    n_layers, n, d = ENGINE_WORKLOADS[workload] if workload in ENGINE_WORKLOADS else LARGE
    return list(layer_features(n_layers, n, d).unbind(0))


def stacked_gram_cka(feats: list[torch.Tensor], unbiased: bool) -> torch.Tensor:
    grams = torch.stack([x @ x.T for x in feats])
    n = grams.shape[1]
    if unbiased:
        grams.diagonal(dim1=1, dim2=2).zero_()
        means = grams.sum(1) / (n - 2)
        means -= means.sum(1, keepdim=True) / (2 * (n - 1))
        grams -= means[:, :, None] + means[:, None, :]
        grams.diagonal(dim1=1, dim2=2).zero_()
    else:
        grams -= grams.mean(1, keepdim=True)
        grams -= grams.mean(2, keepdim=True)
    flat = grams.flatten(1)
    hsic = flat @ flat.T
    diag = hsic.diagonal().sqrt()
    return (hsic / diag[:, None] / diag[None, :]).double()


def authors_pair_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    n = x.shape[0]
    h = torch.eye(n) - torch.ones(n, n) / n
    k, l = x @ x.T, y @ y.T
    hsic_xy = torch.trace(k @ h @ l @ h)
    hsic_xx = torch.trace(k @ h @ k @ h)
    hsic_yy = torch.trace(l @ h @ l @ h)
    return float(hsic_xy / (hsic_xx * hsic_yy).sqrt())


def authors_cka(feats: list[torch.Tensor], pairs: list[tuple[int, int]] | None = None):
    n_layers = len(feats)
    pairs = pairs or [(a, b) for a in range(n_layers) for b in range(a, n_layers)]
    out = torch.full((n_layers, n_layers), float("nan"), dtype=torch.float64)
    for a, b in pairs:
        out[a, b] = out[b, a] = authors_pair_cka(feats[a], feats[b])
    return out


def run(impl: str, feats: list[torch.Tensor], unbiased: bool):
    if impl == "critlayers":
        return cl.cka_matrix(feats, unbiased=unbiased)
    if impl == "floor":
        return [x @ x.T for x in feats]
    if impl == "floor-onednn":
        linear = torch.ops.mkldnn._linear_pointwise
        return [linear(x, x, None, "none", [], None) for x in feats]
    if impl == "stacked":
        return stacked_gram_cka(feats, unbiased)
    if impl == "authors":
        return authors_cka(feats)
    raise ValueError(f"run: impl must be critlayers, floor, floor-onednn, stacked or authors, "
                     f"got {impl!r}")


def reference_layers(n_layers: int, n: int) -> list[int]:
    """Layers on which the float64 reference is computed (all of them when that is cheap)."""
    if n <= 1024:
        return list(range(n_layers))
    return sorted({0, n_layers // 2, n_layers - 1})


def max_error(got: torch.Tensor, feats: list[torch.Tensor], unbiased: bool) -> float:
    layers = reference_layers(len(feats), feats[0].shape[0])
    expected = ref.cka_matrix([feats[i] for i in layers], unbiased=unbiased)
    picked = got[layers][:, layers]
    return float((picked - expected).abs().max())


def gram_flops(feats: list[torch.Tensor]) -> float:
    """Floating-point operations of the full Gram products: 2 n^2 d per layer."""
    return float(sum(2 * x.shape[0] ** 2 * x.shape[1] for x in feats))


def peak_extra_memory(workload: str, impl: str, unbiased: bool) -> int:
    """Peak resident memory of one call above the resident memory before it, in bytes."""
    feats = features(workload)
    # Page in the code and thread pools of this implementation on a small input first, so
    # that only the call's own allocations count.
    run(impl, [x[:64] for x in feats[:2]], unbiased)
    with PeakRSS() as memory:
        run(impl, feats, unbiased)
    return memory.extra


if __name__ == "__main__":
    workload, impl, estimator = sys.argv[1:4]
    extra = peak_extra_memory(workload, impl, estimator == "unbiased")
    print(json.dumps({"workload": workload, "impl": impl, "estimator": estimator,
                      "peak_extra_bytes": extra}))
