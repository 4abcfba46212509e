"""Benchmark critlayers against every installed peer CKA library on the same workloads.

Usage (from the repository root)::

    python -m benchmarks.peers.run                     # every workload, writes RESULTS.md
    python -m benchmarks.peers.run --workloads A,M --timeout 60

Each (workload, library, estimator) cell runs in its own Python process so that time and memory
are measured without interference, and a cell that crashes, exceeds the memory cap or the time
limit is reported as such. In each cell:

1. the inputs are generated (seeded, identical for every library);
2. the first call is made while a thread samples the process RSS every 2 ms; *peak memory* is the
   highest RSS seen minus the RSS just before the call, i.e. the extra resident CPU memory the
   call needed (allocator caches included, shared libraries excluded because they were already
   loaded by the import);
3. the call is repeated (up to ``--repeats`` times, within a 30 s budget) and the median wall time
   is reported; a call slower than a third of the time limit is reported from its single cold run;
4. the result is written back and compared with a float64 reference computed here from the
   formulas (``critlayers.reference``), independently of every library; the largest absolute
   difference over the CKA matrix is reported.

Engine workloads (all-pairs linear CKA matrix of float32 activations): A 18 layers n=512 d=640,
B 32 layers n=300 d=4096, C 18 layers n=4096 d=640, D one pair n=8192 d=1024. Model workload M:
two randomly initialised 6-block transformer encoders (d_model 128) compared block by block with
minibatch CKA over 256 sequences of 16 tokens in batches of 32, through each library's own model
API; critlayers' row is its drop-in ``critlayers.compat.pytorch_cka.compute_cka``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

from benchmarks.memory import PeakRSS as _PeakRSS

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "results" / "peers"
RSS_CAP = 20 * 2**30

# (library label, import name, estimators it offers on engine workloads)
ENGINE_LIBS = [
    ("critlayers", "critlayers", ("biased", "unbiased")),
    ("pytorch-cka", "cka", ("unbiased",)),
    ("ckatorch", "ckatorch", ("biased", "unbiased")),
]
MODEL_LIBS = [
    ("critlayers", "critlayers"),
    ("critlayers (compat.torch_cka)", "critlayers"),
    ("pytorch-cka", "cka"),
    ("torch-cka", "torch_cka"),
    ("cka-pytorch", "cka_pytorch"),
    ("ckatorch", "ckatorch"),
]
DIST_NAMES = {"cka": "pytorch-cka", "torch_cka": "torch-cka", "ckatorch": "ckatorch",
              "cka_pytorch": "cka-pytorch", "critlayers": None}


# ---------------------------------------------------------------------------------------------
# Implementations run inside a cell process.


def _engine_call(lib: str, estimator: str, feats: torch.Tensor):
    unbiased = estimator == "unbiased"
    pair = feats.shape[0] == 2
    if lib == "critlayers":
        import critlayers as cl

        if pair:
            return lambda: cl.linear_cka(feats[0], feats[1], unbiased=unbiased).reshape(1, 1)
        return lambda: cl.cka_matrix(feats, unbiased=unbiased)
    if lib == "pytorch-cka":
        import cka

        if pair:
            return lambda: cka.cka_from_features(feats[0], feats[1])
        return lambda: cka.cka_from_features(feats, feats)
    if lib == "ckatorch":
        import ckatorch

        def all_pairs():
            n_layers = feats.shape[0]
            out = torch.ones(n_layers, n_layers, dtype=torch.float64)
            for i in range(n_layers):
                for j in range(i + 1, n_layers):
                    out[i, j] = out[j, i] = ckatorch.cka_base(feats[i], feats[j],
                                                              unbiased=unbiased)
            return out

        if pair:
            return lambda: ckatorch.cka_base(feats[0], feats[1], unbiased=unbiased).reshape(1, 1)
        return all_pairs
    raise ValueError(f"unknown engine library {lib!r}")


def _model_call(lib: str):
    import warnings

    from torch.utils.data import DataLoader, TensorDataset

    from benchmarks.peers.workloads import MODEL_WORKLOAD, model_pair

    pair = model_pair()
    loader = DataLoader(TensorDataset(pair.inputs, torch.zeros(len(pair.inputs))),
                        batch_size=MODEL_WORKLOAD["batch_size"])
    m1, m2, layers = pair.model1, pair.model2, pair.layers
    warnings.simplefilter("ignore")
    if lib == "critlayers":
        from critlayers.compat.pytorch_cka import compute_cka

        return lambda: compute_cka(m1, m2, loader, layers=layers, device="cpu", progress=False)[0]
    if lib == "critlayers (compat.torch_cka)":
        from critlayers.compat.torch_cka import CKA

        def run():
            session = CKA(m1, m2, "enc1", "enc2", layers, layers)
            session.compare(loader, loader)
            return session.hsic_matrix

        return run
    if lib == "pytorch-cka":
        import cka

        return lambda: cka.compute_cka(m1, m2, loader, layers=layers, device="cpu",
                                       progress=False)[0]
    if lib == "torch-cka":
        import torch_cka

        def run():
            session = torch_cka.CKA(m1, m2, "enc1", "enc2", layers, layers)
            session.compare(loader, loader)
            return session.hsic_matrix

        return run
    if lib == "cka-pytorch":
        from cka_pytorch import CKACalculator

        def run():
            calc = CKACalculator(m1, m2, model1_layers=layers, model2_layers=layers,
                                 device=torch.device("cpu"), verbose=False)
            return calc.calculate_cka_matrix(loader, num_epochs=1)

        return run
    raise ValueError(f"no model-level runner for {lib!r}")


def run_cell(workload: str, lib: str, estimator: str, repeats: int, timeout: float,
             out_path: str) -> None:
    """Body of one cell process: build inputs, measure, write JSON and the result tensor."""
    import gc

    from benchmarks.peers.workloads import ENGINE_WORKLOADS, layer_features

    torch.manual_seed(0)
    if workload in ENGINE_WORKLOADS:
        feats = layer_features(*ENGINE_WORKLOADS[workload])
        call = _engine_call(lib, estimator, feats)
    else:
        call = _model_call(lib)
    gc.collect()
    with _PeakRSS() as mem:
        start = time.perf_counter()
        result = call()
        cold = time.perf_counter() - start
    times = []
    if cold < timeout / 3:
        n_runs = max(1, min(repeats, int(30.0 / max(cold, 1e-6))))
        for _ in range(n_runs):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    torch.save(torch.as_tensor(result).detach().double().cpu(), out_path + ".pt")
    Path(out_path).write_text(json.dumps({
        "median_s": statistics.median(times) if times else cold,
        "runs": len(times),
        "cold_s": cold,
        "peak_rss_bytes": mem.peak - mem.base,
    }))


# ---------------------------------------------------------------------------------------------
# References, computed in the parent process from critlayers.reference (float64).


def _reference_engine(workload: str) -> dict[str, torch.Tensor]:
    from benchmarks.peers.workloads import ENGINE_WORKLOADS, layer_features
    from critlayers import reference as ref

    path = CACHE / f"ref_{workload}.pt"
    if path.exists():
        return torch.load(path)
    feats = layer_features(*ENGINE_WORKLOADS[workload]).double()
    out = {}
    if feats.shape[0] == 2:
        for est in ("biased", "unbiased"):
            value = ref.feature_space_linear_cka(feats[0], feats[1], unbiased=est == "unbiased")
            out[est] = torch.tensor([[value]], dtype=torch.float64)
    else:
        centred = {"biased": [], "unbiased": []}
        for x in feats:
            k = ref.gram_linear(x)
            centred["biased"].append(ref.center_gram(k).flatten())
            centred["unbiased"].append(ref.center_gram(k, unbiased=True).flatten())
            del k
        for est, grams in centred.items():
            g = torch.stack(grams)
            inner = g @ g.T
            norms = torch.diagonal(inner).sqrt()
            out[est] = inner / (norms[:, None] * norms[None, :])
            del g
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


def _reference_model() -> torch.Tensor:
    from benchmarks.peers.workloads import MODEL_WORKLOAD, model_pair
    from critlayers import reference as ref

    path = CACHE / "ref_M.pt"
    if path.exists():
        return torch.load(path)
    pair = model_pair()
    acts: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for side, model in enumerate((pair.model1, pair.model2)):
        modules = dict(model.named_modules())
        for name in pair.layers:
            handles.append(modules[name].register_forward_hook(
                lambda mod, inp, out, key=(side, name): acts.__setitem__(key, out)))
    n_layers = len(pair.layers)
    xy = torch.zeros(n_layers, n_layers, dtype=torch.float64)
    xx = torch.zeros(n_layers, dtype=torch.float64)
    yy = torch.zeros(n_layers, dtype=torch.float64)
    with torch.no_grad():
        for batch in pair.inputs.split(MODEL_WORKLOAD["batch_size"]):
            pair.model1(batch)
            pair.model2(batch)
            k = [ref.gram_linear(acts[(0, name)].flatten(1)) for name in pair.layers]
            l = [ref.gram_linear(acts[(1, name)].flatten(1)) for name in pair.layers]  # noqa: E741
            for i in range(n_layers):
                xx[i] += ref.hsic(k[i], k[i], unbiased=True)
                yy[i] += ref.hsic(l[i], l[i], unbiased=True)
                for j in range(n_layers):
                    xy[i, j] += ref.hsic(k[i], l[j], unbiased=True)
    for handle in handles:
        handle.remove()
    out = xy / (xx[:, None] * yy[None, :]).sqrt()
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


# ---------------------------------------------------------------------------------------------
# Parent: schedule cells, enforce limits, write the table.


def _launch(workload, lib, estimator, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cell.json")
        cmd = [sys.executable, "-m", "benchmarks.peers.run", "--cell", workload, lib, estimator,
               out, "--repeats", str(args.repeats), "--timeout", str(args.timeout)]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        ps = psutil.Process(proc.pid)
        start, status = time.monotonic(), None
        while proc.poll() is None:
            if time.monotonic() - start > args.timeout:
                status = f"timeout (> {args.timeout:.0f} s)"
            else:
                try:
                    if ps.memory_info().rss > RSS_CAP:
                        status = f"OOM (> {RSS_CAP / 2**30:.0f} GiB RSS)"
                except psutil.NoSuchProcess:
                    pass
            if status:
                proc.kill()
                break
            time.sleep(0.05)
        _, stderr = proc.communicate()
        if status:
            return {"status": status}
        if proc.returncode != 0:
            last = [line for line in stderr.strip().splitlines() if line.strip()]
            reason = last[-1][:120] if last else f"exit code {proc.returncode}"
            if proc.returncode == -9 or "MemoryError" in stderr or "out of memory" in stderr:
                reason = "OOM: " + reason
            return {"status": "error: " + reason}
        cell = json.loads(Path(out).read_text())
        cell["result"] = torch.load(out + ".pt")
        cell["status"] = "ok"
        return cell


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("numpy", "pytorch-cka", "torch-cka", "ckatorch", "cka-pytorch"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def _machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = psutil.virtual_memory().total / 2**30
    return (f"{cpu}, {os.cpu_count()} logical cores visible, torch threads "
            f"{torch.get_num_threads()}, {mem:.0f} GiB RAM, {platform.system()} "
            f"{platform.release()}")


def _fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _fmt_mem(nbytes: float) -> str:
    return f"{max(nbytes, 0) / 2**20:.0f} MiB"


def _installed(import_name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(import_name) is not None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="A,B,C,D,M")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per cell")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="max |error| vs the float64 reference to count as correct")
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    parser.add_argument("--cell", nargs=4, metavar=("WORKLOAD", "LIB", "ESTIMATOR", "OUT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cell:
        run_cell(*args.cell[:3], args.repeats, args.timeout, args.cell[3])
        return 0

    from benchmarks.peers.workloads import ENGINE_WORKLOADS

    load_start = os.getloadavg()[0]
    rows = []
    for workload in args.workloads.split(","):
        if workload in ENGINE_WORKLOADS:
            print(f"[{workload}] float64 reference ...", flush=True)
            refs = _reference_engine(workload)
            plan = [(lib, imp, est) for est in ("biased", "unbiased")
                    for lib, imp, ests in ENGINE_LIBS if est in ests]
        else:
            print("[M] float64 reference ...", flush=True)
            refs = {"unbiased (minibatch)": _reference_model()}
            plan = [(lib, imp, "unbiased (minibatch)") for lib, imp in MODEL_LIBS]
        baseline = {}
        for lib, imp, est in plan:
            if not _installed(imp):
                rows.append((workload, lib, est, {"status": "not installed"}))
                continue
            if lib == "ckatorch" and workload == "M":
                rows.append((workload, lib, est, {"status": (
                    "not comparable: its model API keeps only the last batch and treats "
                    "(batch, seq, d) outputs as per-sequence token batches")}))
                continue
            print(f"[{workload}] {lib} {est} ...", flush=True)
            cell = _launch(workload, lib, est, args)
            if cell["status"] == "ok":
                err = float((cell.pop("result") - refs[est]).abs().nan_to_num(float("inf"))
                            .max())
                cell["max_err"] = err
                if err > args.tolerance:
                    cell["status"] = "inaccurate"
                if lib == "critlayers":
                    baseline[est] = cell
            rows.append((workload, lib, est, cell))
            print(f"    {cell.get('status')} {cell.get('median_s', '')}", flush=True)
        for row in rows:
            if row[0] == workload and "median_s" in row[3] and row[2] in baseline:
                base = baseline[row[2]]
                row[3]["time_ratio"] = row[3]["median_s"] / base["median_s"]
                row[3]["mem_ratio"] = (row[3]["peak_rss_bytes"] / base["peak_rss_bytes"]
                                       if base["peak_rss_bytes"] > 2**20 else None)

    lines = [
        "## Peer libraries",
        "",
        f"Machine: {_machine()}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in _versions().items()) + ". 1-minute load average "
        f"{load_start:.1f} at the start and {os.getloadavg()[0]:.1f} at the end (other work on "
        "the machine inflates absolute times; ratios are measured under the same conditions).",
        "",
        f"Command: `python -m benchmarks.peers.run --workloads {args.workloads} --timeout "
        f"{args.timeout:.0f}`. Time: median wall time of up to {args.repeats} warm calls (a cell "
        "slower than a third of the limit: its single cold call). Peak memory: highest RSS "
        "during the first call minus RSS before it (sampled every 2 ms, CPU resident memory). "
        "Error: max |CKA - float64 reference| over the matrix; 'inaccurate' above "
        f"{args.tolerance:g}. Ratios: this row / the critlayers row of the same workload and "
        "estimator (time ratio > 1: critlayers is faster).",
        "",
        "| workload | library | estimator | status | time | peak memory | max error | "
        "time ratio | memory ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for workload, lib, est, cell in rows:
        has = "median_s" in cell
        mem_ratio = cell.get("mem_ratio")
        lines.append("| " + " | ".join([
            workload, lib, est, cell["status"],
            (_fmt_time(cell["median_s"]) + ("" if cell["runs"] else " (cold)")) if has else "-",
            _fmt_mem(cell["peak_rss_bytes"]) if has else "-",
            f"{cell['max_err']:.1e}" if "max_err" in cell else "-",
            f"{cell['time_ratio']:.2f}" if "time_ratio" in cell else "-",
            f"{mem_ratio:.2f}" if mem_ratio is not None else "-",
        ]) + " |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
