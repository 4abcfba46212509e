"""Benchmarks of the CKA engine against its baselines, on workloads shaped like real activations.

Run: ``python -m pytest benchmarks/test_bench_engine.py --benchmark-only -s``
(``CRITLAYERS_BENCH_LARGE=1`` adds the exact 50 000-token case). Each workload's cells run in
one session; before timing, every implementation's result is checked against the float64
reference. At the end the session writes ``benchmarks/results/engine.md``: median time, the
ratios to the Gram-product floors measured in the same run (``x @ x.T``, and the same products
in oneDNN where torch has it), achieved GFLOP/s of the floor's formula (2 n^2 d per layer),
maximum error and peak extra memory (measured in a fresh process per cell, see
``benchmarks/engine_cells.py``).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
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

# Rounds of the interleaved comparison: each round times the floors and both estimators back
# to back, so that all of them see the same machine conditions.
INTERLEAVED_ROUNDS = {"A": 15, "B": 11, "C": 3, "D": 3}

_rows: list[dict] = []
_interleaved: list[dict] = []
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


ONEDNN = torch.backends.mkldnn.is_available()
IMPLS = [("floor", "-"), *([("floor-onednn", "-")] if ONEDNN else []), ("critlayers", "biased"),
         ("critlayers", "unbiased"), ("stacked", "unbiased"), ("authors", "biased")]
CASES = [(w, impl, est) for w in ENGINE_WORKLOADS for impl, est in IMPLS]
FLOORS = ("floor", "floor-onednn")


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
        if impl not in FLOORS:
            row["error"] = cells.max_error(result, feats, unbiased)
            tolerance = 1e-6 if impl == "critlayers" else 1e-1
            assert row["error"] < tolerance, f"{impl} on {workload}: error {row['error']}"
        rounds = 5 if impl == "critlayers" or impl in FLOORS else 1
        benchmark.pedantic(cells.run, args=(impl, feats, unbiased), rounds=rounds,
                           warmup_rounds=1 if rounds > 1 else 0)
        row["time"] = benchmark.stats.stats.median
    row["gflops"] = cells.gram_flops(feats) / row["time"] / 1e9
    row["memory"] = _memory(workload, impl, estimator) if impl != "authors" or limit is None \
        else None
    _rows.append(row)
    _write_results()


@pytest.mark.parametrize("workload", list(ENGINE_WORKLOADS))
def test_engine_interleaved(benchmark, workload):
    """The floors and the engine timed in alternation, for ratios that load changes cannot skew.

    On a shared machine the speed available to a process drifts over seconds, so cells timed
    one after another can differ by tens of percent for reasons of their own. Here every round
    times each floor and both estimators once, in an order rotated from round to round, and
    the reported ratio is the median over rounds of the ratio within a round.
    """
    feats = _feats(workload)
    impls = [(impl, est) for impl, est in IMPLS if impl in FLOORS or impl == "critlayers"]
    for impl, est in impls:
        result = cells.run(impl, feats, est == "unbiased")
        if impl not in FLOORS:
            error = cells.max_error(result, feats, est == "unbiased")
            assert error < 1e-6, f"{impl} ({est}) on {workload}: error {error}"
    times: dict[tuple[str, str], list[float]] = {key: [] for key in impls}

    def one_round():
        start_at = len(times[impls[0]]) % len(impls)
        for impl, est in impls[start_at:] + impls[:start_at]:
            start = time.perf_counter()
            cells.run(impl, feats, est == "unbiased")
            times[(impl, est)].append(time.perf_counter() - start)

    benchmark.group = f"{workload}-interleaved"
    benchmark.pedantic(one_round, rounds=INTERLEAVED_ROUNDS[workload])
    for (impl, est), ts in times.items():
        ratios = {floor: [t / f for t, f in zip(ts, times[(floor, "-")], strict=True)]
                  for floor in FLOORS if (floor, "-") in times}
        _interleaved.append({
            "workload": workload, "shape": ENGINE_WORKLOADS[workload], "impl": impl,
            "estimator": est, "rounds": len(ts), "time": statistics.median(ts),
            "ratios": {floor: (statistics.median(r), min(r), max(r))
                       for floor, r in ratios.items()}})
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


def _fmt_span(span: tuple[float, float, float] | None) -> str:
    if span is None:
        return "-"
    median, low, high = span
    return f"{median:.2f} ({low:.2f}–{high:.2f})"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _write_results() -> None:
    """Rewrites the results table after every cell, so an interrupted run keeps what it has."""
    floors = {impl: {r["workload"]: r["time"] for r in _rows if r["impl"] == impl}
              for impl in FLOORS}

    def ratio(r, impl):
        base = floors[impl].get(r["workload"])
        return f"{r['time'] / base:.2f}" if base else "-"

    lines = [
        "| workload (layers, n, d) | implementation | estimator | median time | ratio to floor"
        " | ratio to oneDNN floor | floor GFLOP/s | max error vs float64 | peak extra memory"
        " | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in _rows:
        error = r.get("error")
        lines.append(
            f"| {r['workload']} {tuple(r['shape'])} | {r['impl']} | {r['estimator']} | "
            f"{r['time'] * 1e3:.1f} ms | {ratio(r, 'floor')} | {ratio(r, 'floor-onednn')} | "
            f"{r['gflops']:.1f} | {'-' if error is None else f'{error:.1e}'} | "
            f"{_fmt_mem(r['memory'])} | {r.get('note', '')} |")
    if _interleaved:
        lines += [
            "",
            "Interleaved rounds (ratios: median over rounds of the ratio within a round, with "
            "the lowest and highest):",
            "",
            "| workload (layers, n, d) | implementation | estimator | rounds | median time | "
            "ratio to floor | ratio to oneDNN floor |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in _interleaved:
            spans = [_fmt_span(r["ratios"].get(floor)) for floor in FLOORS]
            lines.append(
                f"| {r['workload']} {tuple(r['shape'])} | {r['impl']} | {r['estimator']} | "
                f"{r['rounds']} | {r['time'] * 1e3:.1f} ms | {spans[0]} | {spans[1]} |")
    widths = sorted({d for _, _, d in ENGINE_WORKLOADS.values()})
    backends = ", ".join(f"d = {d}: {cl.cpu_product_backend(d)}" for d in widths)
    header = (f"Machine: {_cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads; engine CPU Gram products ({backends}); "
              f"load average (1 min) when the table was written {os.getloadavg()[0]:.1f}.\n\n")
    RESULTS.parent.mkdir(exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(header + "\n".join(lines) + "\n")
    tmp.replace(RESULTS)
