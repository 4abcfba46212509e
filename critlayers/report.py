"""Pictures and the HTML report of a scan.

Everything here works from the JSON-ready dictionary of a scan (``ScanResult.to_dict()``), so a
report can be rebuilt from a saved ``scan.json`` alone. Figures use Matplotlib's Agg backend
through the object-oriented API (no global ``pyplot`` state), so they render without a
display and do not disturb a notebook's own figures.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping

import numpy as np

__all__ = ["plot_cka", "plot_shift", "plot_compare", "figure_png", "render_html"]


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _nan(values) -> np.ndarray:
    return np.asarray([math.nan if v is None else v for v in values], dtype=np.float64)


def _tick_step(n_layers: int) -> int:
    for step in (1, 2, 4, 5, 8, 10, 16, 20):
        if n_layers / step <= 24:
            return step
    return max(1, n_layers // 24)


def _title(result: Mapping) -> str:
    model = result.get("model", {}).get("name", "model")
    prompts = result.get("prompts", {})
    return f"{model} - {prompts.get('count', '?')} prompts ({prompts.get('name', '?')})"


def plot_cka(result: Mapping):
    """Heatmap of the all-pairs CKA matrix, both axes labelled by block index.

    Args:
        result: a scan dictionary (``ScanResult.to_dict()``) with ``"cka"``.

    Returns:
        A :class:`matplotlib.figure.Figure`.
    """
    m = _nan([v for row in result["cka"] for v in row]).reshape(len(result["cka"]), -1)
    n_layers = m.shape[0]
    fig = _figure(6.4, 5.6)
    ax = fig.add_subplot()
    finite = m[np.isfinite(m)]
    vmin = float(finite.min()) if finite.size else 0.0
    image = ax.imshow(
        m, cmap="viridis", vmin=min(vmin, 1.0), vmax=1.0, origin="upper", interpolation="nearest"
    )
    ticks = list(range(0, n_layers, _tick_step(n_layers)))
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xlabel("layer (block index)")
    ax.set_ylabel("layer (block index)")
    estimator = result.get("settings", {}).get("estimator", "")
    ax.set_title(f"Linear CKA between block outputs ({estimator})\n{_title(result)}", fontsize=10)
    cbar = fig.colorbar(image, ax=ax, shrink=0.85)
    cbar.set_label("CKA")
    return fig


def plot_shift(result: Mapping):
    """Shift score per layer, the critical layers marked, and the bootstrap band if present.

    Args:
        result: a scan dictionary with ``"shift"``, ``"critical_layers"``, ``"settings"`` and
            optionally ``"bootstrap"``.

    Returns:
        A :class:`matplotlib.figure.Figure`.
    """
    shift = _nan(result["shift"])
    layers = np.arange(len(shift))
    critical = list(result.get("critical_layers", []))
    settings = result.get("settings", {})
    fig = _figure(7.2, 4.2)
    ax = fig.add_subplot()
    boot = result.get("bootstrap")
    if boot:
        low, high = _nan(boot["shift_low"]), _nan(boot["shift_high"])
        ax.fill_between(
            layers,
            low,
            high,
            color="tab:blue",
            alpha=0.2,
            linewidth=0,
            label=f"{100 * boot['ci']:.0f}% bootstrap interval ({boot['n_boot']} resamples)",
        )
    ax.plot(layers, shift, "-o", color="tab:blue", markersize=4, label="shift score δ")
    if critical:
        ax.plot(
            critical,
            shift[critical],
            "o",
            color="tab:red",
            markersize=9,
            markerfacecolor="none",
            markeredgewidth=2,
            label=f"critical layers (k = {len(critical)})",
        )
        for layer in critical:
            ax.annotate(
                str(layer),
                (layer, shift[layer]),
                textcoords="offset points",
                xytext=(0, -15),
                ha="center",
                color="tab:red",
                fontsize=9,
            )
    ax.set_xticks(list(range(0, len(shift), _tick_step(len(shift)))))
    ax.set_xlim(-0.5, len(shift) - 0.5)
    finite = shift[np.isfinite(shift)]
    if finite.size:
        lo = float(np.nanmin(_nan(boot["shift_low"]))) if boot else float(finite.min())
        hi = float(np.nanmax(_nan(boot["shift_high"]))) if boot else float(finite.max())
        pad = max(0.02 * (hi - lo), 1e-4)
        ax.set_ylim(min(lo, float(finite.min())) - 4 * pad, max(hi, float(finite.max())) + pad)
    ax.set_xlabel("layer (block index)")
    ax.set_ylabel(f"δ (mean CKA, window {settings.get('window', '?')})")
    ax.set_title(
        f"Shift score per layer (low = large representation change)\n{_title(result)}", fontsize=10
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def plot_compare(comparison: Mapping):
    """The shift curves of two scans on one axis, with their correlation in the title.

    Args:
        comparison: the output of :func:`critlayers.scan.compare_results`.

    Returns:
        A :class:`matplotlib.figure.Figure`.
    """
    fig = _figure(7.2, 4.2)
    ax = fig.add_subplot()
    for key, color in (("a", "tab:blue"), ("b", "tab:orange")):
        side = comparison[key]
        shift = _nan(side["shift"])
        prompts = side.get("prompts", {})
        ax.plot(
            np.arange(len(shift)),
            shift,
            "-o",
            color=color,
            markersize=4,
            label=f"{prompts.get('name', key)} ({prompts.get('count', '?')} prompts)",
        )
        crit = side.get("critical_layers", [])
        ax.plot(
            crit,
            shift[crit],
            "o",
            color=color,
            markersize=9,
            markerfacecolor="none",
            markeredgewidth=2,
        )
    n_layers = len(comparison["a"]["shift"])
    ax.set_xticks(list(range(0, n_layers, _tick_step(n_layers))))
    ax.set_xlabel("layer (block index)")
    ax.set_ylabel("shift score δ")
    model = comparison["a"].get("model") or "model"
    ax.set_title(
        f"{model}: shift score on two prompt sets (circles: critical layers)\n"
        f"Pearson {_fmt(comparison['pearson'], 3)}, "
        f"Spearman {_fmt(comparison['spearman'], 3)}",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def figure_png(fig) -> bytes:
    """Render a figure to PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _kv_table(rows: Mapping, css: str = "kv") -> str:
    body = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{_fmt(v)}</td></tr>" for k, v in rows.items()
    )
    return f'<table class="{css}">{body}</table>'


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;
max-width:1100px;padding:0 1em;color:#1d1d1f;line-height:1.45}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.15em;margin-top:1.6em;
border-bottom:1px solid #ddd;padding-bottom:.2em}
.sub{color:#555;margin-top:0} .figs{display:flex;flex-wrap:wrap;gap:1em}
.figs img{max-width:100%;height:auto;border:1px solid #eee}
table{border-collapse:collapse;font-size:.92em} td,th{padding:.25em .7em;text-align:right}
table.layers tr:nth-child(even){background:#f6f6f8} table.layers th{background:#eceef2}
tr.critical td{font-weight:600;color:#b00020} table.kv th{text-align:left;color:#444}
table.kv td{text-align:left;font-family:ui-monospace,monospace}
.note{color:#555;font-size:.9em}
"""


def render_html(result: Mapping, images: Mapping[str, bytes]) -> str:
    """One self-contained HTML page: pictures as base64 PNG, the layer table and settings.

    Args:
        result: a scan dictionary (``ScanResult.to_dict()``).
        images: picture title to PNG bytes, shown in order.

    Returns:
        The page as a string; it loads nothing from outside itself.
    """
    shift = result["shift"]
    ranks = result.get("ranks") or [None] * len(shift)
    critical = set(result.get("critical_layers", []))
    other = result.get("other_scores") or {}
    boot = result.get("bootstrap")
    settings = result.get("settings", {})
    model = result.get("model", {})
    prompts = result.get("prompts", {})

    head = ["layer", "δ", "rank", "critical"]
    if boot:
        head += [f"{100 * boot['ci']:.0f}% interval", f"in top-{boot['top_k']}"]
    score_cols = [(k, v) for k, v in other.items() if isinstance(v, dict) and "values" in v]
    head += [v.get("label", k) for k, v in score_cols]
    rows = []
    for layer, delta in enumerate(shift):
        cells = [str(layer), _fmt(delta), _fmt(ranks[layer]), "●" if layer in critical else ""]
        if boot:
            low, high = boot["shift_low"][layer], boot["shift_high"][layer]
            cells.append("–" if low is None else f"{low:.4f} – {high:.4f}")
            cells.append(f"{100 * boot['topk_freq'][layer]:.0f}%")
        cells += [_fmt(v["values"][layer]) for _, v in score_cols]
        cls = ' class="critical"' if layer in critical else ""
        rows.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    table = (
        '<table class="layers" id="layers"><thead><tr>'
        + "".join(f"<th>{html.escape(h)}</th>" for h in head)
        + "</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )

    figs = "".join(
        f'<figure><img alt="{html.escape(title)}" title="{html.escape(title)}" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}"></figure>'
        for title, png in images.items()
    )

    corr = ""
    if score_cols:
        corr_rows = {v.get("label", k): v.get("spearman_vs_shift") for k, v in score_cols}
        corr = (
            "<h2>Other layer scores</h2><p class='note'>Spearman rank correlation with δ "
            "over the scored layers. Both scores grow with the size of a block's change, "
            "so agreement with δ shows as a negative correlation.</p>" + _kv_table(corr_rows)
        )
    boot_html = ""
    if boot:
        boot_html = (
            f"<p class='note'>Bootstrap: {boot['n_boot']} resamples of the prompts "
            f"(seed {boot['seed']}) with replacement; the interval column gives the "
            f"{100 * (1 - boot['ci']) / 2:.1f}th to "
            f"{100 * (1 + boot['ci']) / 2:.1f}th percentiles of the resampled δ, "
            f"moved by the bootstrap estimate of the bias (repeated prompts raise "
            f"the biased CKA), and 'in top-{boot['top_k']}' how often the layer was "
            f"among the {boot['top_k']} lowest.</p>"
        )
    crit_text = ", ".join(str(c) for c in sorted(critical)) or "none"
    info = {
        "model": model.get("name"),
        "source": model.get("source"),
        "layers": model.get("n_layers"),
        "prompts": f"{prompts.get('count')} from {prompts.get('name')}",
        "prompt sha256": prompts.get("sha256"),
    }
    timings = {
        k: (f"{v:.2f} s" if isinstance(v, float) else v)
        for k, v in (result.get("timings") or {}).items()
        if not k.endswith("_unix")
    }
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>critlayers scan - {html.escape(str(model.get("name", "")))}</title>
<style>{_CSS}</style></head>
<body>
<h1>Critical layers of {html.escape(str(model.get("name", "the model")))}</h1>
<p class="sub">Critical layers (lowest shift score δ, k = {len(critical)}):
<strong id="critical">{crit_text}</strong></p>
<p class="note">δ<sup>l</sup> is the mean linear CKA between block l and the blocks in a
window of {_fmt(settings.get("window"))} centred on it (itself included), computed from the
{html.escape(str(settings.get("token", "last")))}-token states of every block
(Liu et al., arXiv:2506.00382). Low δ marks a large change of representation.</p>
<div class="figs">{figs}</div>
<h2>Layers</h2>
{boot_html}
{table}
{corr}
<h2>Run</h2>
{_kv_table(info)}
<h2>Settings</h2>
{_kv_table(settings)}
<h2>Timings</h2>
{_kv_table(timings)}
<h2>Versions</h2>
{_kv_table(result.get("versions") or {})}
<p class="note">critlayers scan schema {html.escape(str(result.get("schema_version")))},
written {html.escape(str(result.get("created", "")))}.</p>
</body></html>
"""
