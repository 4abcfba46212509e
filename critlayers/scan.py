"""End-to-end scan: a model's all-pairs layer CKA, shift scores and critical layers.

The method is that of Liu et al., "Spectral Insights into Data-Oblivious Critical Layers in
Large Language Models" (arXiv:2506.00382): feed prompts (no generation), take the state of the
last prompt token after every transformer block, compute linear CKA between every pair of
blocks, and score each block by the mean CKA over a window of blocks centred on it
(:func:`critlayers.scores.shift_scores`). The blocks with the lowest scores are the critical
layers.

Two estimators are offered:

* ``"biased"`` (the paper's): the full-batch biased linear CKA on all captured states;
* ``"unbiased"``: the minibatch estimator of Nguyen et al. (arXiv:2010.15327), unbiased HSIC
  accumulated batch by batch (``critlayers.MinibatchCKA``), so only one batch of states is
  ever held. ``token="all"`` (every real token) always uses it.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from . import scores as _scores
from ._io import atomic_write_text, commit_files
from .functional import cka_matrix
from .minibatch import MinibatchCKA

__all__ = [
    "scan",
    "ScanResult",
    "SCHEMA_VERSION",
    "compare_results",
    "read_cka_csv",
    "TOKENS",
    "ESTIMATORS",
    "MIN_ROWS",
]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
TOKENS = ("last", "mean", "all")
ESTIMATORS = ("biased", "unbiased")
# Fewest rows one estimate needs: biased HSIC needs two examples, the unbiased (U-statistic)
# HSIC divides by n (n - 3), so it needs four per minibatch.
MIN_ROWS = {"biased": 2, "unbiased": 4}


def _nan_to_none(values) -> list:
    return [None if v is None or not math.isfinite(v) else float(v) for v in values]


def _json_safe(obj):
    """Recursively turn numpy scalars, tuples, paths and NaN into plain JSON values."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _json_safe(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    return str(obj)


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("critlayers", "torch", "transformers", "numpy", "scipy", "matplotlib"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            module = sys.modules.get(dist)
            out[dist] = getattr(module, "__version__", "not installed")
    return out


@dataclass
class ScanResult:
    """Result of :func:`scan`.

    Attributes:
        cka: (n_layers, n_layers) float64 CKA between block outputs.
        shift: (n_layers,) shift score ``delta^l``; NaN where the window does not fit.
        ranking: scored layers from lowest to highest ``delta``.
        ranks: rank of each layer (1 = lowest ``delta``), ``None`` where unscored.
        critical_layers: the ``top_k`` lowest-``delta`` layers, sorted by index.
        model: name, source, number of layers and loader information.
        prompts: prompt set name, source, count and sha256.
        settings: every option that shaped the numbers.
        timings: seconds spent loading, formatting prompts, in forward passes, in CKA, in the
            other scores and bootstrap, and in total.
        versions: Python, platform and library versions.
        other_scores: ``{"block_influence": {...}, "angular_distance": {...}}``, each with
            ``label``, ``values`` (per layer) and ``spearman_vs_shift``.
        bootstrap: the bootstrap summary, or ``None`` when not requested.
        created: UTC time of the scan, ISO 8601.
        schema_version: version of the JSON layout.
    """

    cka: np.ndarray
    shift: np.ndarray
    ranking: list[int]
    ranks: list[int | None]
    critical_layers: list[int]
    model: dict
    prompts: dict
    settings: dict
    timings: dict
    versions: dict
    other_scores: dict = field(default_factory=dict)
    bootstrap: _scores.BootstrapResult | dict | None = None
    created: str = ""
    schema_version: int = SCHEMA_VERSION

    @property
    def n_layers(self) -> int:
        """Number of blocks scanned."""
        return int(self.cka.shape[0])

    def to_dict(self) -> dict:
        """The result as plain JSON values (NaN as ``None``); the layout of ``scan.json``."""
        boot = self.bootstrap
        if isinstance(boot, _scores.BootstrapResult):
            boot = boot.to_dict()
        return _json_safe(
            {
                "schema_version": self.schema_version,
                "created": self.created,
                "model": self.model,
                "prompts": self.prompts,
                "settings": self.settings,
                "critical_layers": list(self.critical_layers),
                "ranking": list(self.ranking),
                "ranks": list(self.ranks),
                "shift": _nan_to_none(self.shift),
                "cka": [_nan_to_none(row) for row in self.cka],
                "other_scores": self.other_scores,
                "bootstrap": boot,
                "timings": self.timings,
                "versions": self.versions,
            }
        )

    def to_json(self, path: str | os.PathLike | None = None, indent: int = 1) -> str:
        """Serialise to JSON; when ``path`` is given, also write it there atomically.

        Returns:
            The JSON text.
        """
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False) + "\n"
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_dict(cls, data: dict) -> ScanResult:
        """Rebuild a result from :meth:`to_dict` output (the bootstrap stays a dictionary)."""
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"ScanResult.from_dict: schema_version {version!r} is not "
                f"supported; this critlayers reads version {SCHEMA_VERSION}"
            )
        nan = [[math.nan if v is None else v for v in row] for row in data["cka"]]
        return cls(
            cka=np.asarray(nan, dtype=np.float64),
            shift=np.asarray(
                [math.nan if v is None else v for v in data["shift"]], dtype=np.float64
            ),
            ranking=list(data["ranking"]),
            ranks=list(data["ranks"]),
            critical_layers=list(data["critical_layers"]),
            model=data["model"],
            prompts=data["prompts"],
            settings=data["settings"],
            timings=data["timings"],
            versions=data["versions"],
            other_scores=data.get("other_scores") or {},
            bootstrap=data.get("bootstrap"),
            created=data.get("created", ""),
            schema_version=version,
        )

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> ScanResult:
        """Load a saved ``scan.json`` (or the folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "scan.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"ScanResult.from_json: no scan result at {str(path)!r}; "
                f"pass a scan.json file or the folder that holds one"
            ) from None
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"ScanResult.from_json: {str(path)!r} is not valid JSON "
                f"({exc.msg}, line {exc.lineno})"
            ) from None
        if not isinstance(data, dict) or "cka" not in data or "shift" not in data:
            raise ValueError(
                f"ScanResult.from_json: {str(path)!r} is not a critlayers scan "
                f"result (no 'cka' and 'shift' keys)"
            )
        return cls.from_dict(data)

    def cka_csv(self) -> str:
        """The CKA matrix as CSV: a header ``layer,0,1,...`` and one row per layer.

        Values are written with ``repr`` precision, so :func:`read_cka_csv` restores them
        exactly; an undefined entry is an empty field.
        """
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["layer", *range(self.n_layers)])
        for layer, row in enumerate(self.cka):
            writer.writerow([layer, *("" if not math.isfinite(v) else repr(float(v)) for v in row)])
        return buf.getvalue()

    def plot(self) -> dict:
        """Matplotlib figures for a notebook: ``{"cka": heatmap, "shift": shift curve}``."""
        from .report import plot_cka, plot_shift

        data = self.to_dict()
        return {"cka": plot_cka(data), "shift": plot_shift(data)}

    def table(self) -> str:
        """A plain-text table: layer, shift score, rank, critical mark (and bootstrap)."""
        boot = self.to_dict()["bootstrap"]
        head = f"{'layer':>5}  {'delta':>8}  {'rank':>4}  crit"
        if boot:
            head += f"  {100 * boot['ci']:.0f}% interval        top-{boot['top_k']}"
        lines = [head]
        critical = set(self.critical_layers)
        for layer in range(self.n_layers):
            delta = self.shift[layer]
            rank = self.ranks[layer]
            line = (
                f"{layer:>5}  {'-' if not math.isfinite(delta) else f'{delta:.5f}':>8}  "
                f"{'-' if rank is None else rank:>4}  {'  *' if layer in critical else '':4}"
            )
            if boot:
                low, high = boot["shift_low"][layer], boot["shift_high"][layer]
                interval = "-" if low is None else f"{low:.5f} - {high:.5f}"
                line += f"  {interval:<19}  {100 * boot['topk_freq'][layer]:4.0f}%"
            lines.append(line.rstrip())
        return "\n".join(lines)

    def save(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """Write scan.json, cka.csv, cka.png, shift.png and report.html into ``out_dir``.

        All five files are rendered and staged before any existing file is replaced, then
        moved into place one atomic rename each, ``scan.json`` last (see
        :func:`critlayers._io.commit_files`). A failure anywhere before the renames (while
        plotting, rendering or writing) leaves a previous result in ``out_dir`` untouched.
        Files are replaced individually rather than by swapping the folder, so that unrelated
        files in ``out_dir`` survive.

        Returns:
            File name to path, for the five files.
        """
        from .report import figure_png, plot_cka, plot_shift, render_html

        data = self.to_dict()
        pngs: dict[str, bytes] = {}

        def png(name, plot):
            def produce():
                pngs[name] = figure_png(plot(data))
                return pngs[name]

            return produce

        def report() -> bytes:
            images = {
                "CKA between layers": pngs["cka.png"],
                "Shift score per layer": pngs["shift.png"],
            }
            return render_html(data, images).encode("utf-8")

        producers = {
            "cka.csv": lambda: self.cka_csv().encode("utf-8"),
            "cka.png": png("cka.png", plot_cka),
            "shift.png": png("shift.png", plot_shift),
            "report.html": report,
            "scan.json": lambda: (json.dumps(data, indent=1, allow_nan=False) + "\n").encode(
                "utf-8"
            ),
        }
        return commit_files(out_dir, producers)


def read_cka_csv(path: str | os.PathLike) -> np.ndarray:
    """Read a ``cka.csv`` written by :meth:`ScanResult.save` back into an array."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    if not rows or rows[0][:1] != ["layer"]:
        raise ValueError(f"read_cka_csv: {str(path)!r} does not start with a 'layer' header")
    return np.asarray(
        [[math.nan if v == "" else float(v) for v in row[1:]] for row in rows[1:]], dtype=np.float64
    )


def _check_int(fn: str, name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{fn}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _chunks(batches: Iterable[list[torch.Tensor]], min_rows: int) -> Iterator[list[torch.Tensor]]:
    """Regroup batches so that every chunk has at least ``min_rows`` rows.

    A batch is held back until the next one arrives; a short batch is merged into its
    neighbour. At most two batches are held at once. Yields nothing when the total is below
    ``min_rows``.
    """
    ready: list[torch.Tensor] | None = None
    pending: list[list[torch.Tensor]] = []
    for batch in batches:
        pending.append(batch)
        if sum(int(b[0].shape[0]) for b in pending) >= min_rows:
            if ready is not None:
                yield ready
            ready = [torch.cat(parts) for parts in zip(*pending, strict=True)]
            pending = []
    if pending and ready is not None:
        ready = [torch.cat(parts) for parts in zip(ready, *pending, strict=True)]
    if ready is not None:
        yield ready


def _minibatch_cka(feats: Sequence[torch.Tensor], batch_size: int) -> torch.Tensor:
    """Unbiased minibatch CKA of held states, in minibatches of ``batch_size`` rows."""
    acc = MinibatchCKA(len(feats), unbiased=True)
    n = int(feats[0].shape[0])
    parts = ([f[i : i + batch_size] for f in feats] for i in range(0, n, batch_size))
    for chunk in _chunks(parts, MIN_ROWS["unbiased"]):
        acc.update(chunk)
    return acc.compute()


def _check_device(device) -> None:
    """Refuse a device string torch does not know, or a GPU that this machine lacks."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"scan: device={device!r} is not a torch device; use 'cpu', 'cuda' or 'cuda:N'"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"scan: device={device!r} but CUDA is not available here; use device='cpu'"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(
            f"scan: device={device!r} but only {torch.cuda.device_count()} CUDA devices are visible"
        )


class _Timer:
    """Accumulates wall time spent inside ``with timer:`` blocks."""

    def __init__(self):
        self.total = 0.0

    def __enter__(self):
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.total += time.perf_counter() - self._t0


def _timed(iterable: Iterable, timer: _Timer) -> Iterator:
    it = iter(iterable)
    while True:
        with timer:
            try:
                item = next(it)
            except StopIteration:
                return
        yield item


def scan(
    model=None,
    data=None,
    *,
    n: int | None = 300,
    token: str = "last",
    window: int = 5,
    top_k: int = 5,
    estimator: str | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "float32",
    device_map=None,
    seed: int = 0,
    bootstrap: int = 0,
    ci: float = 0.95,
    angular_n: int = 1,
    max_length: int | None = None,
    blocks=None,
    allow_download: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> ScanResult:
    """Find the critical layers of a language model.

    Feeds every prompt (in the model's chat template, or a plain instruction template when it
    has none) through the model, captures the chosen token's state after every block,
    computes the all-pairs linear CKA matrix, the shift score ``delta^l`` of each block (mean
    CKA over a window of ``window`` blocks centred on it, itself included; arXiv:2506.00382)
    and ranks the blocks by it. The same states give block influence and angular distance for
    comparison, and optionally a bootstrap over prompts.

    Args:
        model: ``None`` for the embedded default model, a local Hugging Face folder, a GGUF
            file, a hub id (with ``allow_download``), or an already loaded
            :class:`critlayers.models.LoadedModel`.
        data: ``None`` for the bundled default prompt set, a prompt file or ``datasets``
            folder, ``"builtin:NAME"``, or a :class:`critlayers.prompts.PromptSet` (used whole).
        n: number of prompts drawn reproducibly with ``seed`` from a loaded source; ``None``
            for all. A source with fewer prompts is used whole, with a warning.
        token: ``"last"`` prompt token (the paper's), ``"mean"`` over real tokens, or
            ``"all"`` real tokens (streamed; minibatch estimator only).
        window: odd shift-score window, at most the number of blocks.
        top_k: number of critical layers.
        estimator: ``"biased"`` (full batch), ``"unbiased"`` (minibatch) or ``None`` for
            biased unless ``token="all"``.
        batch_size: prompts per forward pass, also the minibatch size of the unbiased
            estimator (short minibatches are merged with a neighbour to keep at least 4 rows).
        device: torch device for the forward passes.
        dtype: model weight dtype, ``"float32"``, ``"bfloat16"`` or ``"float16"``; states are
            always cast to float32.
        device_map: passed to the loader for models split over devices.
        seed: seed for prompt subsampling and the bootstrap.
        bootstrap: number of bootstrap resamples of the prompts (0 = none).
        ci: coverage of the bootstrap interval.
        angular_n: block span of the angular distance score.
        max_length: truncate longer prompts to this many tokens, keeping their end (one
            warning counts them); ``None`` uses the model's context length.
        blocks: block selection passed to the capture (``None`` = found automatically).
        allow_download: let the loader fetch a hub id.
        trust_remote_code: allow a model's own code to run.
        progress: show progress bars.

    Returns:
        A :class:`ScanResult`.

    Raises:
        ValueError: for an invalid option, a window larger than the model, ``top_k`` above
            the number of scored layers, or too few prompts for the estimator; loader
            errors (unknown model or prompt file) propagate unchanged.

    Note:
        The biased estimator holds every captured state, ``4 n n_layers d`` bytes (14 MB for
        300 prompts and 18 blocks of width 640). The unbiased estimator with ``token="all"``
        holds at most two batches.
    """
    fn = "scan"
    t_start = time.perf_counter()
    if token not in TOKENS:
        raise ValueError(f"{fn}: token must be one of {', '.join(TOKENS)}; got {token!r}")
    if estimator is None:
        estimator = "unbiased" if token == "all" else "biased"
    if estimator not in ESTIMATORS:
        raise ValueError(f"{fn}: estimator must be 'biased' or 'unbiased', got {estimator!r}")
    if token == "all" and estimator == "biased":
        raise ValueError(
            f"{fn}: token='all' streams every token into the minibatch "
            f"estimator; use estimator='unbiased', or token='last' or 'mean' "
            f"for the full-batch biased estimator"
        )
    if (
        isinstance(window, bool)
        or not isinstance(window, (int, np.integer))
        or window < 1
        or window % 2 == 0
    ):
        raise ValueError(
            f"{fn}: window must be a positive odd integer (3, 5, 7, ...), got {window!r}"
        )
    top_k = _check_int(fn, "top_k", top_k, 1)
    batch_size = _check_int(fn, "batch_size", batch_size, 1)
    bootstrap = _check_int(fn, "bootstrap", bootstrap, 0)
    if n is not None:
        n = _check_int(fn, "n", n, 1)
    if bootstrap and token == "all":
        raise ValueError(
            f"{fn}: bootstrap={bootstrap} needs the per-prompt states, which "
            f"token='all' does not keep; use token='last' or 'mean'"
        )
    if not 0.0 < ci < 1.0:
        raise ValueError(f"{fn}: ci must be in (0, 1), got {ci!r}")
    _check_device(device)

    from .models import LoadedModel, load_model
    from .prompts import PromptSet, format_prompts, load_prompts

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    prompt_set = data if isinstance(data, PromptSet) else load_prompts(data)
    available = len(prompt_set)
    if not isinstance(data, PromptSet) and n is not None and n < available:
        prompt_set = load_prompts(data, n=n, seed=seed)
    need = MIN_ROWS[estimator] if token != "all" else 1
    if len(prompt_set) < need:
        raise ValueError(
            f"{fn}: estimator={estimator!r} needs at least {need} prompts, got "
            f"{len(prompt_set)} from {prompt_set.source!s}; add prompts"
            + (" or use estimator='biased'" if estimator == "unbiased" else "")
        )
    if not isinstance(data, PromptSet) and n is not None and n > available:
        warnings.warn(
            f"scan: n={n} but {prompt_set.source} holds {available} usable prompts; "
            f"using all {available}",
            stacklevel=2,
        )
    n_prompts = len(prompt_set)
    timings["prompts"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if isinstance(model, LoadedModel):
        lm = model
    else:
        lm = load_model(
            model,
            dtype=dtype,
            device=device,
            device_map=device_map,
            allow_download=allow_download,
            trust_remote_code=trust_remote_code,
            progress=progress,
        )
    timings["load"] = time.perf_counter() - t0
    n_layers = int(lm.n_layers)
    _scores.check_window(window, n_layers, fn)
    n_scored = n_layers - 2 * (window // 2)
    if top_k > n_scored:
        raise ValueError(
            f"{fn}: top_k={top_k} exceeds the {n_scored} layers that a window of "
            f"{window} scores in a {n_layers}-layer model; use top_k <= "
            f"{n_scored}"
        )

    t0 = time.perf_counter()
    texts = format_prompts(prompt_set, lm.tokenizer)
    timings["prompts"] += time.perf_counter() - t0

    from .capture import iter_block_states

    forward_timer, cka_timer, score_timer = _Timer(), _Timer(), _Timer()
    state_scores = _scores.StateScores(n_layers, angular_n=angular_n)
    held: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    keep = token != "all"
    minibatch = MinibatchCKA(n_layers, unbiased=True) if estimator == "unbiased" else None
    n_rows = 0
    timings["forward_start_unix"] = time.time()
    batches = iter_block_states(
        lm.model,
        lm.tokenizer,
        texts,
        blocks=blocks,
        token=token,
        batch_size=batch_size,
        max_length=max_length,
        include_input=True,
        progress=progress,
    )

    def consume(stream):
        nonlocal n_rows
        for states in stream:
            if len(states) != n_layers + 1:
                raise RuntimeError(
                    f"{fn}: capture returned {len(states)} tensors per batch, "
                    f"expected {n_layers + 1} (embedding + {n_layers} blocks)"
                )
            emb, outs = states[0], states[1:]
            with score_timer:
                state_scores.update(emb, outs)
            n_rows += int(emb.shape[0])
            if keep:
                for layer, out in enumerate(outs):
                    held[layer].append(out)
            yield outs

    stream = consume(_timed(batches, forward_timer))
    if minibatch is not None:
        for chunk in _chunks(stream, MIN_ROWS["unbiased"]):
            with cka_timer:
                minibatch.update(chunk)
    else:
        for _ in stream:
            pass
    timings["forward"] = forward_timer.total
    if n_rows < MIN_ROWS[estimator]:
        raise ValueError(
            f"{fn}: estimator={estimator!r} needs at least "
            f"{MIN_ROWS[estimator]} captured rows, got {n_rows}; add prompts"
        )

    feats = [torch.cat(parts) for parts in held] if keep else []
    with cka_timer:
        if minibatch is not None:
            cka = minibatch.compute()
        else:
            cka = cka_matrix(feats, unbiased=False)
    timings["cka"] = cka_timer.total
    cka_np = np.asarray(cka.detach().cpu().to(torch.float64).numpy(), dtype=np.float64)

    shift = _scores.shift_scores(cka_np, window)
    ranking = _scores.rank_layers(shift)
    critical = _scores.critical_layers(shift, top_k)

    with score_timer:
        bi = state_scores.block_influence()
        ad = state_scores.angular_distance()
        other = {
            "block_influence": {
                "label": "block influence",
                "values": _nan_to_none(bi),
                "spearman_vs_shift": _scores.rank_correlation(bi, shift),
            },
            "angular_distance": {
                "label": f"angular distance (n={angular_n})",
                "n": angular_n,
                "values": _nan_to_none(ad),
                "spearman_vs_shift": _scores.rank_correlation(ad, shift),
            },
        }
    timings["scores"] = score_timer.total

    boot = None
    if bootstrap:
        t0 = time.perf_counter()
        cka_fn = None
        if estimator == "unbiased":

            def cka_fn(resampled):
                return _minibatch_cka(resampled, batch_size)

        boot = _scores.bootstrap_shift(
            feats, window=window, top_k=top_k, n_boot=bootstrap, seed=seed, ci=ci, cka_fn=cka_fn
        )
        timings["bootstrap"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start

    info = dict(getattr(lm, "info", {}) or {})
    model_info = {"name": lm.name, "source": str(lm.source), "n_layers": n_layers, **info}
    prompts_info = {
        "name": prompt_set.name,
        "source": str(prompt_set.source),
        "count": n_prompts,
        "sha256": prompt_set.sha256(),
    }
    settings = {
        "token": token,
        "estimator": estimator,
        "kernel": "linear",
        "window": int(window),
        "top_k": top_k,
        "n": n,
        "batch_size": batch_size,
        "device": str(device),
        "dtype": str(dtype),
        "seed": int(seed),
        "bootstrap": bootstrap,
        "ci": float(ci),
        "angular_n": int(angular_n),
        "max_length": max_length,
        "rows": n_rows,
    }
    logger.info(
        "scan of %s on %d prompts: critical layers %s (%.1f s)",
        lm.name,
        n_prompts,
        critical,
        timings["total"],
    )
    return ScanResult(
        cka=cka_np,
        shift=shift,
        ranking=ranking,
        ranks=_scores.layer_ranks(shift),
        critical_layers=critical,
        model=_json_safe(model_info),
        prompts=prompts_info,
        settings=settings,
        timings=timings,
        versions=_versions(),
        other_scores=other,
        bootstrap=boot,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def compare_results(a: ScanResult | str | os.PathLike, b: ScanResult | str | os.PathLike) -> dict:
    """Compare the shift curves of two scans of one model (data-obliviousness).

    Args:
        a: a :class:`ScanResult` or the path of a ``scan.json`` (or its folder).
        b: the same for the second scan.

    Returns:
        A dictionary with both curves, their Pearson and Spearman correlation over the layers
        scored in both, both critical sets and their overlap.

    Raises:
        ValueError: if the scans have different numbers of layers.
    """
    ra = a if isinstance(a, ScanResult) else ScanResult.from_json(a)
    rb = b if isinstance(b, ScanResult) else ScanResult.from_json(b)
    if ra.n_layers != rb.n_layers:
        raise ValueError(
            f"compare_results: the scans have {ra.n_layers} and {rb.n_layers} "
            f"layers; compare two scans of the same model"
        )
    corr = _scores.curve_correlation(ra.shift, rb.shift)
    ca, cb = set(ra.critical_layers), set(rb.critical_layers)
    return {
        "a": {
            "model": ra.model.get("name"),
            "prompts": ra.prompts,
            "shift": _nan_to_none(ra.shift),
            "critical_layers": sorted(ca),
        },
        "b": {
            "model": rb.model.get("name"),
            "prompts": rb.prompts,
            "shift": _nan_to_none(rb.shift),
            "critical_layers": sorted(cb),
        },
        "pearson": corr["pearson"],
        "spearman": corr["spearman"],
        "n_layers_compared": corr["n_layers"],
        "critical_overlap": sorted(ca & cb),
        "critical_jaccard": len(ca & cb) / len(ca | cb) if ca | cb else math.nan,
    }
