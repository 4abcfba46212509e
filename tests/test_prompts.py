"""Tests of prompt loading, normalisation, subsampling and formatting."""

from __future__ import annotations

import csv
import importlib.util
import json

import pytest
from tiny_models import make_tokenizer

from critlayers.prompts import (
    DEFAULT_PROMPT_SET,
    PromptSet,
    builtin_prompt_sets,
    format_prompts,
    load_prompts,
)

ALPACA = [
    {"instruction": "Name a tree.", "input": "", "output": "Oak."},
    {"instruction": "Summarise the text.", "input": "Cats sleep a lot.", "output": "Cats nap."},
    {"instruction": "List two colours.", "input": "", "output": "Red, blue."},
]
DOLLY = [
    {
        "instruction": "Who wrote it?",
        "context": "Hamlet was written by Shakespeare.",
        "response": "Shakespeare",
        "category": "closed_qa",
    },
    {
        "instruction": "Give a synonym for happy.",
        "context": "",
        "response": "glad",
        "category": "brainstorming",
    },
]
CHAT = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4"},
        ]
    },
    {"conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello"}]},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_builtin_sets_are_large_varied_and_alpaca():
    names = builtin_prompt_sets()
    assert DEFAULT_PROMPT_SET in names and "reasoning" in names
    default = load_prompts()
    assert default.name == DEFAULT_PROMPT_SET and default.source == "builtin:instructions"
    assert len(default) >= 300
    reasoning = load_prompts("builtin:reasoning")
    assert len(reasoning) >= 200
    for prompt_set in (default, reasoning):
        rows = prompt_set.prompts
        assert all(set(r) == {"instruction", "input"} for r in rows)
        assert len({(r["instruction"], r["input"]) for r in rows}) == len(rows)
        lengths = sorted(len(r["instruction"]) + len(r["input"]) for r in rows)
        assert lengths[-1] > 4 * lengths[0]
    assert sum(bool(r["input"]) for r in default.prompts) >= 50
    assert len({r["instruction"] for r in default.prompts}) >= 250


def test_builtin_files_are_alpaca_with_all_three_keys():
    from importlib import resources

    root = resources.files("critlayers").joinpath("data")
    for name in builtin_prompt_sets():
        for line in root.joinpath(f"{name}.jsonl").read_text().splitlines():
            assert set(json.loads(line)) == {"instruction", "input", "output"}
    assert root.joinpath("SOURCES.md").is_file()


def test_unknown_builtin_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown bundled prompt set 'nope'.*builtin:reasoning"):
        load_prompts("builtin:nope")


def test_alpaca_jsonl(tmp_path):
    ps = load_prompts(write_jsonl(tmp_path / "a.jsonl", ALPACA))
    assert ps.name == "a" and ps.source == str(tmp_path / "a.jsonl")
    assert ps.prompts[1] == {"instruction": "Summarise the text.", "input": "Cats sleep a lot."}
    assert all("output" not in r for r in ps.prompts)


def test_dolly_context_becomes_input(tmp_path):
    ps = load_prompts(write_jsonl(tmp_path / "dolly.jsonl", DOLLY))
    assert ps.prompts == [
        {"instruction": "Who wrote it?", "input": "Hamlet was written by Shakespeare."},
        {"instruction": "Give a synonym for happy.", "input": ""},
    ]


def test_chat_messages_drop_the_reference_answer(tmp_path):
    ps = load_prompts(write_jsonl(tmp_path / "chat.jsonl", CHAT))
    assert ps.prompts[0] == {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2 + 2?"},
        ]
    }
    assert ps.prompts[1] == {"messages": [{"role": "user", "content": "Hi there"}]}


@pytest.mark.parametrize("column", ["text", "prompt", "question"])
def test_plain_text_columns(tmp_path, column):
    ps = load_prompts(write_jsonl(tmp_path / "t.jsonl", [{column: " Why? "}, {column: "How?"}]))
    assert ps.prompts == [{"text": "Why?"}, {"text": "How?"}]


def test_question_with_passage(tmp_path):
    rows = [{"question": "is water wet", "passage": "Water is a liquid.", "answer": True}]
    ps = load_prompts(write_jsonl(tmp_path / "boolq.jsonl", rows))
    assert ps.prompts == [{"instruction": "is water wet", "input": "Water is a liquid."}]


def test_json_list_and_object(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps(ALPACA))
    (tmp_path / "obj.json").write_text(json.dumps({"version": 1, "data": DOLLY}))
    (tmp_path / "strings.json").write_text(json.dumps(["first prompt", "second prompt"]))
    assert len(load_prompts(tmp_path / "list.json")) == 3
    assert len(load_prompts(tmp_path / "obj.json")) == 2
    assert load_prompts(tmp_path / "strings.json").prompts[1] == {"text": "second prompt"}


def test_csv(tmp_path):
    path = tmp_path / "p.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(ALPACA)
    ps = load_prompts(path)
    assert ps.prompts == load_prompts(write_jsonl(tmp_path / "p.jsonl", ALPACA)).prompts


def test_txt_one_prompt_per_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("first prompt\n\n  second prompt  \nthird\n")
    assert load_prompts(path).prompts == [
        {"text": "first prompt"},
        {"text": "second prompt"},
        {"text": "third"},
    ]


def test_datasets_directory(tmp_path):
    if importlib.util.find_spec("datasets") is None:
        pytest.skip("the optional package `datasets` is not installed")
    import datasets

    datasets.Dataset.from_list(DOLLY).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ALPACA)}).save_to_disk(
        str(tmp_path / "dd")
    )
    assert len(load_prompts(tmp_path / "ds")) == 2
    assert load_prompts(tmp_path / "dd").prompts[0] == {"instruction": "Name a tree.", "input": ""}


def test_datasets_missing_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    (tmp_path / "ds").mkdir()
    with pytest.raises(ModuleNotFoundError, match=r"ds is a directory.*pip install datasets"):
        load_prompts(tmp_path / "ds")


def test_subsample_is_reproducible_and_ordered():
    a = load_prompts(n=50, seed=3)
    b = load_prompts(n=50, seed=3)
    c = load_prompts(n=50, seed=4)
    full = load_prompts().prompts
    assert a.prompts == b.prompts and a.sha256() == b.sha256()
    assert a.prompts != c.prompts
    positions = [full.index(row) for row in a.prompts]
    assert positions == sorted(positions)
    assert len(load_prompts(n=len(full))) == len(full)


@pytest.mark.parametrize("n", [0, -1, 2.5, True])
def test_bad_n(tmp_path, n):
    with pytest.raises(ValueError, match=r"load_prompts: n="):
        load_prompts(write_jsonl(tmp_path / "a.jsonl", ALPACA), n=n)


def test_n_larger_than_available_names_the_file(tmp_path):
    path = write_jsonl(tmp_path / "small.jsonl", ALPACA)
    with pytest.raises(ValueError, match=r"n=4 but .*small\.jsonl has only 3 usable prompts"):
        load_prompts(path, n=4)


def test_unknown_extension_names_the_file(tmp_path):
    path = tmp_path / "prompts.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(ValueError, match=r"prompts\.parquet has an unknown extension '\.parquet'"):
        load_prompts(path)


def test_no_usable_rows_names_file_and_columns(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"foo": "x", "bar": "y"}, {"foo": ""}])
    with pytest.raises(ValueError) as err:
        load_prompts(path)
    message = str(err.value)
    assert "bad.jsonl has no usable prompt rows" in message
    assert "['foo', 'bar']" in message and "instruction" in message and "messages" in message


def test_empty_file_and_bad_json(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="empty.txt has no usable prompt rows"):
        load_prompts(tmp_path / "empty.txt")
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"broken\.jsonl line 2 is not valid JSON"):
        load_prompts(tmp_path / "broken.jsonl")
    (tmp_path / "scalar.json").write_text("42")
    with pytest.raises(ValueError, match=r"scalar\.json holds a JSON int"):
        load_prompts(tmp_path / "scalar.json")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothere\.jsonl does not exist"):
        load_prompts(tmp_path / "nothere.jsonl")


def test_sha256_is_stable_and_content_sensitive():
    a = PromptSet("a", [{"instruction": "x", "input": ""}], "here")
    b = PromptSet("b", [{"input": "", "instruction": "x"}], "there")
    c = PromptSet("a", [{"instruction": "x", "input": " "}], "here")
    assert a.sha256() == b.sha256() != c.sha256()
    assert len(a.sha256()) == 64 and len(a) == 1


def test_plain_template():
    ps = PromptSet(
        "p",
        [
            {"instruction": "Summarise.", "input": "Cats sleep."},
            {"instruction": "Name a tree.", "input": ""},
            {"text": "Why is the sky blue?"},
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                ]
            },
        ],
        "test",
    )
    texts = format_prompts(ps, make_tokenizer())
    assert texts[0] == "### Instruction:\nSummarise.\n\n### Input:\nCats sleep.\n\n### Response:\n"
    assert texts[1] == "### Instruction:\nName a tree.\n\n### Response:\n"
    assert texts[2] == "### Instruction:\nWhy is the sky blue?\n\n### Response:\n"
    assert texts[3] == "### System:\nBe brief.\n\n### Instruction:\nHi\n\n### Response:\n"
    assert format_prompts(ps, None) == texts


def test_chat_template_with_generation_prompt(tmp_path):
    tokenizer = make_tokenizer(chat_template=True)
    ps = load_prompts(write_jsonl(tmp_path / "a.jsonl", ALPACA))
    texts = format_prompts(ps, tokenizer)
    assert texts[1] == "[BOS]user : Summarise the text.\n\nCats sleep a lot. . assistant :"
    assert all(t.endswith("assistant :") for t in texts)
    assert not any(row["output"] in t for row, t in zip(ALPACA, texts, strict=True))


def test_chat_template_errors_name_the_prompt():
    tokenizer = make_tokenizer()
    tokenizer.chat_template = "{{ raise_exception('no system role') }}"
    ps = PromptSet("p", [{"text": "hi"}], "mine.jsonl")
    with pytest.raises(ValueError, match=r"format_prompts: .*prompt 0 of mine\.jsonl"):
        format_prompts(ps, tokenizer)


def test_reference_responses_never_reach_the_prompt(tmp_path):
    ps = load_prompts(write_jsonl(tmp_path / "d.jsonl", DOLLY + CHAT))
    for text in format_prompts(ps, make_tokenizer()) + format_prompts(
        ps, make_tokenizer(chat_template=True)
    ):
        assert "Shakespeare\n" not in text and "glad" not in text
        assert "Hello" not in text and "4" not in text
