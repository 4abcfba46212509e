"""The scan pipeline on tiny random models: numbers against an independent computation,
result files, atomic saving."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from critlayers import reference
from critlayers import scores as S
from critlayers._io import atomic_write_text, commit_files
from critlayers.models import LoadedModel
from critlayers.prompts import PromptSet, format_prompts
from critlayers.scan import ScanResult, compare_results, read_cka_csv, scan
from tests.tiny_models import SAMPLE_TEXTS, make_config, make_tokenizer

N_LAYERS = 6
TEXTS = SAMPLE_TEXTS + [
    f"{a} {b}"
    for a in ("explain", "describe", "list")
    for b in ("the sun", "two cats", "a short story about water")
]


def _model(norm_identity: bool = True):
    from transformers import AutoModelForCausalLM

    config = make_config("llama")
    config.num_hidden_layers = N_LAYERS
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    if norm_identity:
        # output_hidden_states replaces the last block's output by the final norm's output;
        # without a final norm it is the raw block output, as the capture records it.
        model.model.norm = torch.nn.Identity()
    return model


@pytest.fixture(scope="module")
def lm():
    tok = make_tokenizer(chat_template=True)
    return LoadedModel(
        model=_model(),
        tokenizer=tok,
        name="tiny-llama",
        source="test",
        n_layers=N_LAYERS,
        info={"model_type": "llama"},
    )


@pytest.fixture(scope="module")
def prompts():
    return PromptSet(name="tiny", prompts=[{"text": t} for t in TEXTS], source="test")


def _hidden_states(lm, prompts):
    """Per prompt, the hidden states (n_layers + 1, seq, d) of one unpadded forward pass."""
    tok = lm.tokenizer
    out = []
    for text in format_prompts(prompts, tok):
        add = not text.startswith(tok.bos_token)
        ids = tok([text], add_special_tokens=add, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            hs = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
        out.append(torch.stack([h[0].float() for h in hs]))
    return out


@pytest.fixture(scope="module")
def hidden(lm, prompts):
    return _hidden_states(lm, prompts)


@pytest.fixture(scope="module")
def result(lm, prompts):
    return scan(lm, prompts, window=3, top_k=2, batch_size=4, bootstrap=20, seed=3, progress=False)


def test_biased_cka_equals_reference_on_hidden_states(result, hidden):
    feats = [torch.stack([h[layer + 1, -1] for h in hidden]) for layer in range(N_LAYERS)]
    ref = reference.cka_matrix(feats)
    np.testing.assert_allclose(result.cka, ref.numpy(), rtol=0, atol=2e-5)
    np.testing.assert_allclose(result.shift, S.shift_scores(ref, 3), atol=2e-5)
    assert result.ranking == S.rank_layers(result.shift)
    assert result.critical_layers == S.critical_layers(result.shift, 2)
    assert result.settings["estimator"] == "biased" and result.prompts["count"] == len(TEXTS)


def test_other_scores_equal_hidden_state_computation(result, hidden):
    emb = torch.stack([h[0, -1] for h in hidden])
    states = [torch.stack([h[layer + 1, -1] for h in hidden]) for layer in range(N_LAYERS)]
    bi = result.other_scores["block_influence"]["values"]
    np.testing.assert_allclose(bi, S.block_influence(emb, states), atol=1e-5)
    ad = np.array(result.other_scores["angular_distance"]["values"], dtype=float)
    np.testing.assert_allclose(ad, S.angular_distance(emb, states), atol=1e-5)
    rho = result.other_scores["block_influence"]["spearman_vs_shift"]
    assert rho == pytest.approx(S.rank_correlation(bi, result.shift))


def test_unbiased_single_batch_equals_reference(lm, prompts, hidden):
    res = scan(lm, prompts, estimator="unbiased", window=3, top_k=1, batch_size=64, progress=False)
    feats = [torch.stack([h[layer + 1, -1] for h in hidden]) for layer in range(N_LAYERS)]
    ref = reference.cka_matrix(feats, unbiased=True)
    np.testing.assert_allclose(res.cka, ref.numpy(), atol=5e-5)


def test_unbiased_minibatches_merge_short_tail(lm, prompts):
    # 17 prompts in batches of 5: the tail of 2 is merged into the batch before it.
    res = scan(lm, prompts, estimator="unbiased", window=3, top_k=1, batch_size=5, progress=False)
    assert np.isfinite(res.cka).all() and res.settings["rows"] == len(TEXTS)


def test_all_tokens_stream_equals_reference(lm, prompts, hidden):
    res = scan(lm, prompts, token="all", window=3, top_k=1, batch_size=64, progress=False)
    assert res.settings["estimator"] == "unbiased"
    feats = [torch.cat([h[layer + 1] for h in hidden]) for layer in range(N_LAYERS)]
    assert res.settings["rows"] == feats[0].shape[0]
    ref = reference.cka_matrix(feats, unbiased=True)
    np.testing.assert_allclose(res.cka, ref.numpy(), atol=5e-5)


def test_bootstrap_in_scan_is_seeded(lm, prompts, result):
    again = scan(lm, prompts, window=3, top_k=2, batch_size=4, bootstrap=20, seed=3, progress=False)
    np.testing.assert_allclose(result.bootstrap.samples, again.bootstrap.samples, atol=1e-6)
    boot = result.to_dict()["bootstrap"]
    assert boot["n_boot"] == 20 and boot["top_k"] == 2
    assert sum(boot["topk_freq"]) == pytest.approx(2.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"window": 7}, r"window=7 is larger than the model's 6 layers"),
        ({"window": 4}, r"scan: window must be a positive odd integer"),
        ({"window": 5, "top_k": 3}, r"top_k=3 exceeds the 2 layers"),
        ({"token": "first"}, r"scan: token must be one of"),
        ({"estimator": "fast"}, r"scan: estimator must be"),
        ({"token": "all", "estimator": "biased"}, r"token='all' streams"),
        ({"token": "all", "bootstrap": 5}, r"bootstrap=5 needs the per-prompt states"),
        ({"batch_size": 0}, r"scan: batch_size must be an integer >= 1"),
    ],
)
def test_scan_bad_options(lm, prompts, kwargs, match):
    args = dict(window=3, top_k=1, progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        scan(lm, prompts, **args)


@pytest.mark.parametrize("estimator, count", [("biased", 1), ("unbiased", 3)])
def test_scan_too_few_prompts(lm, estimator, count):
    few = PromptSet(name="few", prompts=[{"text": t} for t in TEXTS[:count]], source="few.txt")
    with pytest.raises(ValueError, match=rf"estimator='{estimator}' needs at least"):
        scan(lm, few, estimator=estimator, window=3, top_k=1, progress=False)


SCHEMA_KEYS = {
    "schema_version",
    "cka",
    "shift",
    "ranking",
    "critical_layers",
    "model",
    "prompts",
    "settings",
    "timings",
    "versions",
    "other_scores",
    "bootstrap",
}


def test_json_schema_and_round_trip(result, tmp_path):
    data = json.loads(result.to_json(tmp_path / "r.json"))
    assert SCHEMA_KEYS <= data.keys()
    assert data["schema_version"] == 1
    assert data["shift"][0] is None and data["shift"][-1] is None
    assert {"count", "sha256"} <= data["prompts"].keys()
    assert {"load", "forward", "cka", "total"} <= data["timings"].keys()
    assert {"torch", "transformers", "python"} <= data["versions"].keys()
    back = ScanResult.from_json(tmp_path / "r.json")
    np.testing.assert_array_equal(back.cka, result.cka)
    np.testing.assert_array_equal(back.shift, result.shift)
    assert back.critical_layers == result.critical_layers
    assert back.to_dict() == data


def test_save_writes_all_files_and_csv_round_trips(result, tmp_path):
    paths = result.save(tmp_path / "out")
    assert list(paths) == ["cka.csv", "cka.png", "shift.png", "report.html", "scan.json"]
    for path in paths.values():
        assert path.stat().st_size > 0
    assert paths["cka.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_array_equal(read_cka_csv(paths["cka.csv"]), result.cka)
    html = paths["report.html"].read_text()
    assert html.count("data:image/png;base64,") == 2 and 'id="layers"' in html
    assert "http://" not in html and "https://" not in html.replace("https://arxiv", "")
    assert sorted(os.listdir(tmp_path / "out")) == sorted(paths)


def test_failed_save_keeps_previous_result(result, tmp_path, monkeypatch):
    out = tmp_path / "out"
    result.save(out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "notes.txt").write_text("mine")

    import critlayers.report as report

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(report, "render_html", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        result.save(out)
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "notes.txt"}
    assert after == before
    assert (out / "notes.txt").read_text() == "mine"


def test_commit_files_failure_cleans_staged_files(tmp_path):
    (tmp_path / "a.txt").write_text("old")

    def fail():
        raise OSError("no space left")

    with pytest.raises(OSError, match="no space"):
        commit_files(tmp_path, {"a.txt": lambda: b"new", "b.txt": fail})
    assert os.listdir(tmp_path) == ["a.txt"] and (tmp_path / "a.txt").read_text() == "old"
    with pytest.raises(ValueError, match="commit_files: producers keys"):
        commit_files(tmp_path, {"../x": lambda: b""})


def test_atomic_write_interrupted_rename_keeps_old(tmp_path, monkeypatch):
    target = tmp_path / "f.json"
    atomic_write_text(target, "old")

    def no_replace(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", no_replace)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(target, "new")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["f.json"]


def test_plot_returns_figures(result):
    figs = result.plot()
    assert set(figs) == {"cka", "shift"}
    assert figs["cka"].axes[0].get_xlabel() == "layer (block index)"
    assert len(figs["shift"].axes[0].collections) == 1  # the bootstrap band


def test_table_marks_critical(result):
    lines = result.table().splitlines()
    assert len(lines) == N_LAYERS + 1
    marked = [int(line.split()[0]) for line in lines[1:] if "*" in line]
    assert marked == result.critical_layers


def test_compare_results(result, tmp_path):
    result.save(tmp_path / "a")
    shifted = ScanResult.from_dict(result.to_dict())
    shifted.shift = shifted.shift * 0.5 + 0.1
    out = compare_results(tmp_path / "a", shifted)
    assert out["pearson"] == pytest.approx(1.0) and out["spearman"] == pytest.approx(1.0)
    assert out["n_layers_compared"] == N_LAYERS - 2 and out["a"]["shift"][0] is None
    with pytest.raises(FileNotFoundError, match="no scan result"):
        compare_results(tmp_path / "missing", result)


@pytest.mark.model
@pytest.mark.slow
def test_default_model_scan_equals_reference_on_same_states():
    from critlayers.capture import iter_block_states
    from critlayers.models import load_model
    from critlayers.prompts import load_prompts

    lm = load_model(None, progress=False)
    prompts = load_prompts(None, n=24, seed=0)
    res = scan(lm, prompts, batch_size=8, progress=False)
    batches = list(
        iter_block_states(
            lm.model,
            lm.tokenizer,
            format_prompts(prompts, lm.tokenizer),
            token="last",
            batch_size=8,
            progress=False,
        )
    )
    feats = [torch.cat([b[layer] for b in batches]) for layer in range(lm.n_layers)]
    ref = reference.cka_matrix(feats)
    assert res.n_layers == lm.n_layers == 18
    np.testing.assert_allclose(res.cka, ref.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(res.shift, S.shift_scores(ref, 5), rtol=0, atol=1e-6)
