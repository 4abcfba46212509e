"""pytest-benchmark view of the peer comparison, on workloads small enough for CI.

Run with::

    pytest benchmarks/peers/test_bench_peers.py --benchmark-only

Every case first checks its result against the float64 reference, then is timed. The critlayers
case of each workload runs first and is the baseline; every peer case records
``ratio_to_critlayers`` (peer median / critlayers median, measured in the same session) in
``extra_info``, which ``--benchmark-json`` exports. The full-size comparison with memory and
timeouts is ``python -m benchmarks.peers.run``.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from benchmarks.peers.workloads import layer_features
from critlayers import reference as ref

SMALL = {"A-small": (8, 256, 256), "B-small": (8, 128, 1024)}
LIBRARIES = ["critlayers", "pytorch-cka", "ckatorch"]
IMPORT_NAME = {"critlayers": "critlayers", "pytorch-cka": "cka", "ckatorch": "ckatorch"}
_BASELINE: dict[str, float] = {}


def _matrix_fn(lib: str, feats: torch.Tensor):
    if lib == "critlayers":
        import critlayers as cl

        return lambda: cl.cka_matrix(feats, unbiased=True)
    if lib == "pytorch-cka":
        import cka

        return lambda: cka.cka_from_features(feats, feats)
    import ckatorch

    def all_pairs():
        n_layers = feats.shape[0]
        out = torch.ones(n_layers, n_layers, dtype=torch.float64)
        for i in range(n_layers):
            for j in range(i + 1, n_layers):
                out[i, j] = out[j, i] = ckatorch.cka_base(feats[i], feats[j], unbiased=True)
        return out

    return all_pairs


@pytest.fixture(scope="module")
def workloads():
    out = {}
    for name, shape in SMALL.items():
        feats = layer_features(*shape)
        out[name] = (feats, ref.cka_matrix(list(feats), unbiased=True))
    return out


@pytest.mark.parametrize("lib", LIBRARIES)
@pytest.mark.parametrize("workload", list(SMALL))
def test_unbiased_cka_matrix(benchmark, workloads, workload, lib):
    if importlib.util.find_spec(IMPORT_NAME[lib]) is None:
        pytest.skip(f"{lib} is not installed")
    feats, expected = workloads[workload]
    fn = _matrix_fn(lib, feats)
    err = float((torch.as_tensor(fn()).double() - expected).abs().max())
    benchmark.extra_info["max_abs_error"] = err
    if lib == "critlayers":
        assert err < 1e-6
    benchmark.group = workload
    benchmark(fn)
    median = benchmark.stats.stats.median
    if lib == "critlayers":
        _BASELINE[workload] = median
    elif workload in _BASELINE:
        benchmark.extra_info["ratio_to_critlayers"] = median / _BASELINE[workload]
