"""Benchmarks of the CKA engine against its baselines, on workloads shaped like real activations.

Run: ``python -m pytest benchmarks/test_bench_engine.py --benchmark-only -s``
(``CRITLAYERS_BENCH_LARGE=1`` adds the exact 50 000-token case). Each workload's cells run in
one session; before timing, every implementation's result is checked against the float64
reference. At the end the session writes ``benchmarks/results/engine.md``: median time, the
ratio to the Gram-product floor measured in the same run, achieved GFLOP/s of the floor's
formula (2 n^2 d per layer), maximum error and peak extra memory (measured in a fresh process
per cell, see ``benchmarks/engine_cells.py``).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import critlayers as cl
from benchmarks import engine_cells as cells
from benchmarks.peers.workloads import ENGINE_WORKLOADS

RESULTS = Path(__file__).parent / "results" / "engine.md"
ROOT = Path(__file__).resolve().parents[1]

# The authors' pattern costs O(n^3) per pair; on large n it is timed on a few pairs and
# extrapolated to all of them, which the table marks.
AUTHORS_PAIRS_LIMIT = {"A": None, "B": None, "C": 2, "D": 1}

_rows: list[dict] = []
_features: dict[str, list[torch.Tensor]] = {}


def _feats(workload: str) -> list[torch.Tensor]:
    if workload not in _features:
        _features.clear()
        _features[workload] = cells.features(workload)
    return _features[workload]


def _memory(workload: str, impl: str, estimator: str) -> float | None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.engine_cells", workload, impl, estimator],
        cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


CASES = [(w, impl, est) for w in ENGINE_WORKLOADS
         for impl, est in [("floor", "-"), ("critlayers", "biased"), ("critlayers", "unbiased"),
                           ("stacked", "unbiased"), ("authors", "biased")]]


@pytest.mark.parametrize("workload, impl, estimator", CASES,
                         ids=[f"{w}-{i}-{e}" for w, i, e in CASES])
def test_engine(benchmark, workload, impl, estimator):
    feats = _feats(workload)
    unbiased = estimator == "unbiased"
    benchmark.group = workload
    n_layers, n, d = ENGINE_WORKLOADS[workload]
    row = {"workload": workload, "impl": impl, "estimator": estimator, "shape": (n_layers, n, d)}
    limit = AUTHORS_PAIRS_LIMIT.get(workload) if impl == "authors" else None
    if limit is not None:
        pairs = [(a, a + 1) for a in range(min(limit, n_layers - 1))]
        start = time.perf_counter()
        got = cells.authors_cka(feats, pairs)
        per_pair = (time.perf_counter() - start) / len(pairs)
        total_pairs = n_layers * (n_layers + 1) // 2
        ref_pairs = cl.cka_matrix(feats)
        row["error"] = max(abs(float(got[a, b] - ref_pairs[a, b])) for a, b in pairs)
        row["time"] = per_pair * total_pairs
        row["note"] = f"extrapolated from {len(pairs)} pair(s)"
        benchmark.pedantic(lambda: None, rounds=1)
    else:
        result = cells.run(impl, feats, unbiased)
        if impl != "floor":
            row["error"] = cells.max_error(result, feats, unbiased)
            tolerance = 1e-6 if impl == "critlayers" else 1e-1
            assert row["error"] < tolerance, f"{impl} on {workload}: error {row['error']}"
        rounds = 5 if impl in ("critlayers", "floor") else 1
        benchmark.pedantic(cells.run, args=(impl, feats, unbiased), rounds=rounds,
                           warmup_rounds=1 if rounds > 1 else 0)
        row["time"] = benchmark.stats.stats.median
    row["gflops"] = cells.gram_flops(feats) / row["time"] / 1e9
    row["memory"] = _memory(workload, impl, estimator) if impl != "authors" or limit is None \
        else None
    _rows.append(row)
    _write_results()


@pytest.mark.skipif(os.environ.get("CRITLAYERS_BENCH_LARGE") != "1",
                    reason="set CRITLAYERS_BENCH_LARGE=1 for the 50 000-token case")
def test_large_exact(benchmark):
    feats = cells.features("LARGE")
    got = benchmark.pedantic(cl.cka_matrix, args=(feats,), rounds=1)
    sub = [0, 9, 17]
    # The full-data float64 reference, in the feature-space form, on three layers.
    expected = _feature_reference([feats[i] for i in sub])
    error = float((got[sub][:, sub] - expected).abs().max())
    assert error < 1e-6
    _rows.append({"workload": "50k", "impl": "critlayers", "estimator": "biased",
                  "shape": cells.LARGE, "time": benchmark.stats.stats.median, "error": error,
                  "gflops": float("nan"), "memory": _memory("LARGE", "critlayers", "biased")})
    _write_results()


def _feature_reference(feats: list[torch.Tensor]) -> torch.Tensor:
    from critlayers import reference as ref

    out = torch.ones(len(feats), len(feats), dtype=torch.float64)
    for a in range(len(feats)):
        for b in range(a + 1, len(feats)):
            out[a, b] = out[b, a] = ref.feature_space_linear_cka(feats[a], feats[b])
    return out


def _fmt_mem(nbytes):
    if nbytes is None:
        return "n/a"
    return f"{nbytes / 2**20:.0f} MiB" if nbytes < 2**30 else f"{nbytes / 2**30:.2f} GiB"


def _write_results() -> None:
    """Rewrites the results table after every cell, so an interrupted run keeps what it has."""
    floor = {r["workload"]: r["time"] for r in _rows if r["impl"] == "floor"}
    lines = [
        "| workload (layers, n, d) | implementation | estimator | median time | ratio to floor"
        " | floor GFLOP/s | max error vs float64 | peak extra memory | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in _rows:
        ratio = r["time"] / floor[r["workload"]] if r["workload"] in floor else float("nan")
        error = r.get("error")
        lines.append(
            f"| {r['workload']} {tuple(r['shape'])} | {r['impl']} | {r['estimator']} | "
            f"{r['time'] * 1e3:.1f} ms | {ratio:.2f} | {r['gflops']:.1f} | "
            f"{'-' if error is None else f'{error:.1e}'} | {_fmt_mem(r['memory'])} | "
            f"{r.get('note', '')} |")
    header = (f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"load average (1 min) when the table was written {os.getloadavg()[0]:.1f}.\n\n")
    RESULTS.parent.mkdir(exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(header + "\n".join(lines) + "\n")
    tmp.replace(RESULTS)
