"""report.html in headless Chromium: it loads without errors, both pictures render and the
layer table is there."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from critlayers import scores as S
from critlayers.scan import SCHEMA_VERSION, ScanResult

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Records errors from the first moment, then writes the checks into the DOM once loaded.
_PROBE_HEAD = """<script>window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message ||
  (e.target && (e.target.src || e.target.href)) || 'error')), true);</script>"""
_PROBE_BODY = """<script>window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const table = document.querySelector('table#layers');
  document.body.setAttribute('data-check', JSON.stringify({
    errors: window.__errors,
    widths: imgs.map(i => i.naturalWidth), complete: imgs.map(i => i.complete),
    table: !!table, rows: table ? table.tBodies[0].rows.length : 0,
    critical: (document.getElementById('critical') || {}).textContent}));
});</script>"""


def _result(n_layers: int = 12) -> ScanResult:
    rng = np.random.default_rng(0)
    idx = np.arange(n_layers)
    cka = np.exp(-np.abs(idx[:, None] - idx[None, :]) / 6.0)
    cka += rng.uniform(0, 0.01, cka.shape)
    cka = np.minimum((cka + cka.T) / 2, 1.0)
    np.fill_diagonal(cka, 1.0)
    shift = S.shift_scores(cka, 5)
    boot = {
        "n_boot": 50,
        "seed": 0,
        "ci": 0.95,
        "top_k": 3,
        "shift_mean": [None if np.isnan(v) else v for v in shift],
        "shift_low": [None if np.isnan(v) else v - 0.01 for v in shift],
        "shift_high": [None if np.isnan(v) else v + 0.01 for v in shift],
        "topk_freq": [0.5] * n_layers,
    }
    return ScanResult(
        cka=cka,
        shift=shift,
        ranking=S.rank_layers(shift),
        ranks=S.layer_ranks(shift),
        critical_layers=S.critical_layers(shift, 3),
        model={"name": "synthetic <model>", "source": "test", "n_layers": n_layers},
        prompts={"name": "synthetic", "source": "test", "count": 40, "sha256": "0" * 64},
        settings={"window": 5, "top_k": 3, "token": "last", "estimator": "biased"},
        timings={"load": 1.0, "forward": 2.0, "cka": 0.01, "total": 3.2},
        versions={"python": "3"},
        other_scores={
            "block_influence": {
                "label": "block influence",
                "values": list(rng.uniform(0, 1, n_layers)),
                "spearman_vs_shift": -0.5,
            }
        },
        bootstrap=boot,
        created="2025-01-01T00:00:00+00:00",
        schema_version=SCHEMA_VERSION,
    )


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium (Debian 'chromium') not found")
def test_report_renders_in_chromium(tmp_path):
    result = _result()
    paths = result.save(tmp_path / "out")
    page = paths["report.html"].read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)=["'](?!data:)""", page), "report loads external files"
    probe = page.replace("<head>", "<head>" + _PROBE_HEAD, 1)
    probe = probe.replace("</body>", _PROBE_BODY + "</body>", 1)
    probe_path = tmp_path / "probe.html"
    probe_path.write_text(probe, encoding="utf-8")
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'prof'}",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=5000",
        "--dump-dom",
        probe_path.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    match = re.search(r'data-check="([^"]*)"', proc.stdout)
    assert match, f"page did not finish loading: {proc.stdout[:500]} {proc.stderr[-1500:]}"
    check = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert check["errors"] == []
    assert len(check["widths"]) == 2 and all(w > 0 for w in check["widths"]), check
    assert all(check["complete"])
    assert check["table"] and check["rows"] == result.n_layers
    assert check["critical"] == ", ".join(map(str, result.critical_layers))
    console_errors = [
        line
        for line in proc.stderr.splitlines()
        if "CONSOLE" in line and ("Uncaught" in line or "Failed" in line or ":ERROR:" in line)
    ]
    assert console_errors == []
