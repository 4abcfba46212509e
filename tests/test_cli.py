"""The ``critlayers`` command line: a full scan of a tiny saved model, and one-line errors with
exit status 2 for every kind of bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from critlayers.cli import main
from critlayers.scan import ScanResult
from tests.tiny_models import SAMPLE_TEXTS, make_config, make_tokenizer

N_LAYERS = 5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    config = make_config("llama")
    config.num_hidden_layers = N_LAYERS
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path, safe_serialization=True)
    make_tokenizer(chat_template=True).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    rows = [{"instruction": t, "input": "", "output": "x"} for t in SAMPLE_TEXTS * 2]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _scan_args(model_dir, data_file, out, *extra):
    return [
        "scan",
        "--model",
        str(model_dir),
        "--data",
        str(data_file),
        "--n",
        "12",
        "--window",
        "3",
        "--top-k",
        "2",
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


def test_scan_happy_path(model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "res"
    rc = main(_scan_args(model_dir, data_file, out, "--bootstrap", "10", "--batch-size", "5"))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    for name in ("scan.json", "cka.csv", "cka.png", "shift.png", "report.html"):
        assert (out / name).is_file()
        assert f"wrote {out / name}" in captured.out
    result = ScanResult.from_json(out)
    assert result.n_layers == N_LAYERS and result.prompts["count"] == 12
    assert result.settings["bootstrap"] == 10 and result.settings["batch_size"] == 5
    assert f"critical layers (k=2): {', '.join(map(str, result.critical_layers))}" in captured.out
    table = [line for line in captured.out.splitlines() if line.strip().startswith(("0", "1"))]
    assert table, captured.out
    # A rerun into the same folder replaces the result and leaves no temporary files.
    assert main(_scan_args(model_dir, data_file, out, "--seed", "1")) == 0
    assert sorted(os.listdir(out)) == [
        "cka.csv",
        "cka.png",
        "report.html",
        "scan.json",
        "shift.png",
    ]
    assert ScanResult.from_json(out).settings["seed"] == 1


def test_compare_command(model_dir, data_file, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_scan_args(model_dir, data_file, a)) == 0
    assert main(_scan_args(model_dir, data_file, b, "--seed", "2")) == 0
    capsys.readouterr()
    assert main(["compare", str(a), str(b / "scan.json"), "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "pearson" in out and "spearman" in out
    data = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert -1.0 <= data["pearson"] <= 1.0 and (tmp_path / "c" / "compare.png").is_file()


def _bad_inputs(model_dir, data_file, tmp):
    not_model = tmp / "notes.txt"
    not_model.write_text("hello")
    gguf_file = tmp / "odd.gguf"
    import gguf

    writer = gguf.GGUFWriter(str(gguf_file), "nonesuch")
    writer.add_tensor("t", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    xml = tmp / "prompts.xml"
    xml.write_text("<p/>")
    unusable = tmp / "unusable.jsonl"
    unusable.write_text('{"foo": 1}\n{"bar": 2}\n')
    one = tmp / "one.txt"
    one.write_text("explain the sun\n")
    three = tmp / "three.txt"
    three.write_text("explain the sun\nname a tree\nlist three books\n")
    m, d = str(model_dir), str(data_file)
    return {
        "unknown model path": (["--model", str(tmp / "missing-model")], "does not exist"),
        "not a model": (["--model", str(not_model)], "is not a model"),
        "unsupported gguf": (["--model", str(gguf_file)], "architecture 'nonesuch'"),
        "unknown prompt format": (["--model", m, "--data", str(xml)], "unknown extension"),
        "missing prompt file": (
            ["--model", m, "--data", str(tmp / "nope.jsonl")],
            "does not exist",
        ),
        "no usable rows": (["--model", m, "--data", str(unusable)], "no usable prompt rows"),
        "too few for biased": (["--model", m, "--data", str(one)], "needs at least 2 prompts"),
        "too few for unbiased": (
            ["--model", m, "--data", str(three), "--estimator", "unbiased"],
            "needs at least 4 prompts",
        ),
        "window larger than model": (
            ["--model", m, "--data", d, "--window", "7"],
            "larger than the model's 5 layers",
        ),
        "even window": (["--model", m, "--data", d, "--window", "4"], "odd"),
        "top-k above scored layers": (["--model", m, "--data", d, "--top-k", "9"], "top_k=9"),
        "bad token": (["--token", "first"], "invalid choice: 'first'"),
        "bad n": (["--n", "0"], "expected a positive integer"),
        "bad device": (["--model", m, "--data", d, "--device", "tpu9"], "not a torch device"),
        "all tokens with biased": (
            ["--model", m, "--data", d, "--token", "all", "--estimator", "biased"],
            "use estimator='unbiased'",
        ),
    }


def test_bad_inputs_exit_2_with_one_line(model_dir, data_file, tmp_path, capsys):
    cases = _bad_inputs(model_dir, data_file, tmp_path)
    for label, (args, expected) in cases.items():
        argv = ["scan", "--out", str(tmp_path / "out"), "--no-progress", "--n", "all"]
        argv += ["--window", "3"] if "--window" not in args else []
        argv += ["--top-k", "1"] if "--top-k" not in args else []
        argv += args
        if label in ("bad token", "bad n"):
            with pytest.raises(SystemExit) as ctx:
                main(argv)
            rc = ctx.value.code
        else:
            rc = main(argv)
        err = capsys.readouterr().err.strip()
        assert rc == 2, (label, err)
        assert "\n" not in err and "Traceback" not in err, (label, err)
        assert err.startswith("critlayers scan: error: "), (label, err)
        assert expected in err, (label, err)
    assert not (tmp_path / "out").exists()


def test_module_entry_point_without_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "critlayers",
            "scan",
            "--model",
            str(tmp_path / "nope"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "does not exist" in lines[0], proc.stderr


def test_debug_shows_traceback(tmp_path):
    with pytest.raises(FileNotFoundError):
        main(["scan", "--model", str(tmp_path / "nope"), "--debug", "--no-progress"])


def test_compare_missing_file(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "x"), str(tmp_path / "y")]) == 2
    assert "no scan result" in capsys.readouterr().err
