"""Prompt sets: loading, normalising, subsampling and formatting.

The critical-layer method feeds only prompts, never responses (Liu et al. 2025,
arXiv:2506.00382, §1): each prompt is wrapped in the model's chat template, or a plain
instruction template when the tokenizer has none, and the state at its last token is kept.

Every row is normalised to one of three shapes:

* ``{"instruction": str, "input": str}``: Alpaca (instruction/input/output), Dolly
  (instruction/context/response) and question/context rows;
* ``{"messages": [{"role": str, "content": str}, ...]}``: chat rows, with trailing assistant
  turns (the reference answer) removed;
* ``{"text": str}``: rows with a single ``text``, ``prompt`` or ``question`` column, and lines
  of a ``.txt`` file.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import pathlib
import random
from dataclasses import dataclass
from importlib import resources

__all__ = [
    "DEFAULT_PROMPT_SET",
    "PromptSet",
    "builtin_prompt_sets",
    "format_prompts",
    "load_prompts",
    "normalise_row",
]

logger = logging.getLogger(__name__)

DEFAULT_PROMPT_SET = "instructions"
_BUILTIN_PREFIX = "builtin:"
_SUFFIXES = (".jsonl", ".json", ".csv", ".txt")
_TEXT_COLUMNS = ("text", "prompt", "question")
_CONTEXT_COLUMNS = ("input", "context", "passage")
_CHAT_COLUMNS = ("messages", "conversations", "conversation")
_USABLE = (
    "instruction (+ input or context), messages (a list of {role, content}), "
    "text, prompt, or question (+ context or passage)"
)
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


@dataclass
class PromptSet:
    """A named list of normalised prompt rows.

    Attributes:
        name: Short name, e.g. ``"instructions"`` or the file stem.
        prompts: Normalised rows (see the module docstring).
        source: ``"builtin:NAME"`` or the resolved path the rows were read from.
    """

    name: str
    prompts: list[dict]
    source: str

    def sha256(self) -> str:
        """Hex SHA-256 of the normalised rows, independent of name, source and key order."""
        payload = json.dumps(
            self.prompts, sort_keys=True, ensure_ascii=False, separators=(",", ":")
        )
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def __len__(self) -> int:
        return len(self.prompts)


def _data_root():
    return resources.files("critlayers").joinpath("data")


def builtin_prompt_sets() -> list[str]:
    """Names of the prompt sets bundled with critlayers, usable as ``"builtin:NAME"``."""
    root = _data_root()
    return sorted(p.name[: -len(".jsonl")] for p in root.iterdir() if p.name.endswith(".jsonl"))


def _clean(value) -> str:
    return value.strip() if isinstance(value, str) else ""


def _normalise_messages(messages) -> dict | None:
    if not isinstance(messages, list):
        return None
    out = []
    for message in messages:
        if not isinstance(message, dict):
            return None
        role = message.get("role", message.get("from"))
        content = message.get("content", message.get("value"))
        if not isinstance(role, str) or not isinstance(content, str):
            return None
        role = _ROLE_ALIASES.get(role.strip().lower(), role.strip().lower())
        out.append({"role": role, "content": content})
    # Only the prompt is fed: drop the reference answer at the end of the conversation.
    while out and out[-1]["role"] == "assistant":
        out.pop()
    if not any(m["role"] == "user" and m["content"].strip() for m in out):
        return None
    return {"messages": out}


def normalise_row(row) -> dict | None:
    """One raw row (a dict or a string) in normalised form, or ``None`` if it is unusable."""
    if isinstance(row, str):
        text = _clean(row)
        return {"text": text} if text else None
    if not isinstance(row, dict):
        return None
    for key in _CHAT_COLUMNS:
        if key in row:
            return _normalise_messages(row[key])
    instruction = _clean(row.get("instruction"))
    if instruction:
        context = next((_clean(row.get(k)) for k in _CONTEXT_COLUMNS if _clean(row.get(k))), "")
        return {"instruction": instruction, "input": context}
    question = _clean(row.get("question"))
    context = next((_clean(row.get(k)) for k in ("context", "passage") if _clean(row.get(k))), "")
    if question and context:
        return {"instruction": question, "input": context}
    for key in _TEXT_COLUMNS:
        text = _clean(row.get(key))
        if text:
            return {"text": text}
    return None


def _read_jsonl(path: pathlib.Path) -> list:
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"load_prompts: {path} line {lineno} is not valid JSON ({exc.msg})"
                ) from exc
    return rows


def _read_json(path: pathlib.Path) -> list:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"load_prompts: {path} is not valid JSON ({exc})") from exc
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        for key in ("data", "rows", "train", "examples", "prompts"):
            if isinstance(data.get(key), list):
                return data[key]
        if len(lists) == 1:
            return lists[0]
        raise ValueError(
            f"load_prompts: {path} holds a JSON object; expected a list of rows, or an object "
            "with one list of rows (e.g. under 'data')"
        )
    if not isinstance(data, list):
        raise ValueError(f"load_prompts: {path} holds a JSON {type(data).__name__}, not a list")
    return data


def _read_csv(path: pathlib.Path) -> list:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _read_txt(path: pathlib.Path) -> list:
    with path.open(encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def _read_dataset_dir(path: pathlib.Path) -> list:
    try:
        import datasets
    except ImportError as exc:
        raise ModuleNotFoundError(
            f"load_prompts: {path} is a directory, read as a data set saved with `datasets`, "
            "which is not installed; `pip install datasets`, or export the rows to .jsonl"
        ) from exc
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise ValueError(
            f"load_prompts: {path} is not a data set saved with `datasets` save_to_disk ({exc})"
        ) from exc
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded.keys())
        if "train" in loaded:
            loaded = loaded["train"]
        elif len(splits) == 1:
            loaded = loaded[splits[0]]
        else:
            raise ValueError(
                f"load_prompts: {path} holds splits {splits} and none is 'train'; save the split "
                "you want on its own"
            )
    return list(loaded)


def _columns(rows: list) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows[:100]:
        if isinstance(row, dict):
            seen.update(dict.fromkeys(row))
    return list(seen)


def _load_builtin(name: str) -> tuple[list, str]:
    names = builtin_prompt_sets()
    if name not in names:
        raise ValueError(
            f"load_prompts: unknown bundled prompt set {name!r}; available: "
            + ", ".join(f"builtin:{n}" for n in names)
        )
    text = _data_root().joinpath(f"{name}.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()], f"builtin:{name}"


def load_prompts(
    source: str | os.PathLike | None = None, n: int | None = None, seed: int = 0
) -> PromptSet:
    """Load a prompt set from a bundled name, a file, or a ``datasets`` directory.

    Args:
        source: ``None`` for the bundled default set, ``"builtin:NAME"`` for a bundled set
            (see :func:`builtin_prompt_sets`), a ``.jsonl``, ``.json``, ``.csv`` or ``.txt``
            file (one prompt per line), or a directory written by ``datasets`` ``save_to_disk``.
        n: Keep a random subset of this many prompts, in their original order.
        seed: Seed of the subsample; the same ``(source, n, seed)`` gives the same prompts.

    Returns:
        A :class:`PromptSet` of normalised rows.

    Raises:
        FileNotFoundError: If the path does not exist.
        ValueError: If the extension is unknown, no row is usable (the message lists the
            columns found and the ones that work), or ``n`` is out of range.
    """
    if source is None:
        source = f"{_BUILTIN_PREFIX}{DEFAULT_PROMPT_SET}"
    text = os.fspath(source)
    if text.startswith(_BUILTIN_PREFIX):
        name = text[len(_BUILTIN_PREFIX) :]
        raw, origin = _load_builtin(name)
        where = origin
    else:
        path = pathlib.Path(text).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"load_prompts: {text} does not exist; give a .jsonl/.json/.csv/.txt file, a "
                f"`datasets` directory, or one of "
                + ", ".join(f"builtin:{n}" for n in builtin_prompt_sets())
            )
        path = path.resolve()
        if path.is_dir():
            raw = _read_dataset_dir(path)
        else:
            suffix = path.suffix.lower()
            readers = {
                ".jsonl": _read_jsonl,
                ".json": _read_json,
                ".csv": _read_csv,
                ".txt": _read_txt,
            }
            if suffix not in readers:
                raise ValueError(
                    f"load_prompts: {path} has an unknown extension {suffix or '(none)'!r}; "
                    f"use one of {', '.join(_SUFFIXES)} or a `datasets` directory"
                )
            raw = readers[suffix](path)
        name, origin, where = path.stem if path.is_file() else path.name, str(path), str(path)

    rows = [r for r in (normalise_row(row) for row in raw) if r is not None]
    if not rows:
        columns = _columns(raw)
        found = f"columns {columns}" if columns else f"{len(raw)} rows and no named columns"
        raise ValueError(
            f"load_prompts: {where} has no usable prompt rows ({found}); a row needs {_USABLE}"
        )
    if len(rows) < len(raw):
        logger.info("load_prompts: skipped %d unusable rows of %s", len(raw) - len(rows), where)

    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"load_prompts: n={n!r}; expected an int >= 1")
        if n > len(rows):
            raise ValueError(f"load_prompts: n={n} but {where} has only {len(rows)} usable prompts")
        keep = sorted(random.Random(seed).sample(range(len(rows)), n))
        rows = [rows[i] for i in keep]
    return PromptSet(name=name, prompts=rows, source=origin)


def _plain(row: dict) -> str:
    if "messages" in row:
        headers = {"system": "System", "user": "Instruction", "assistant": "Response"}
        parts = [
            f"### {headers.get(m['role'], m['role'].title())}:\n{m['content']}\n\n"
            for m in row["messages"]
        ]
        return "".join(parts) + "### Response:\n"
    if "text" in row:
        return f"### Instruction:\n{row['text']}\n\n### Response:\n"
    body = f"### Instruction:\n{row['instruction']}\n\n"
    if row.get("input"):
        body += f"### Input:\n{row['input']}\n\n"
    return body + "### Response:\n"


def _as_messages(row: dict) -> list[dict]:
    if "messages" in row:
        return row["messages"]
    if "text" in row:
        return [{"role": "user", "content": row["text"]}]
    content = row["instruction"]
    if row.get("input"):
        content = f"{content}\n\n{row['input']}"
    return [{"role": "user", "content": content}]


def format_prompts(prompt_set: PromptSet, tokenizer=None) -> list[str]:
    """Render each prompt as the model will see it, ending where the response would begin.

    With a tokenizer that has a chat template, each row becomes a conversation (instruction
    and input joined into one user turn) rendered with ``add_generation_prompt=True``. Without
    one (or with ``tokenizer=None``), the plain instruction template is used::

        ### Instruction:
        {instruction}

        ### Input:
        {input}

        ### Response:

    where the Input section is left out when the row has no input.

    Args:
        prompt_set: The prompts, from :func:`load_prompts`.
        tokenizer: A Hugging Face tokenizer, or ``None`` for the plain template.

    Returns:
        One string per prompt, in order.

    Raises:
        ValueError: If the chat template rejects a row (e.g. a role it does not support).
    """
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if not template:
        return [_plain(row) for row in prompt_set.prompts]
    texts = []
    for i, row in enumerate(prompt_set.prompts):
        try:
            texts.append(
                tokenizer.apply_chat_template(
                    _as_messages(row), tokenize=False, add_generation_prompt=True
                )
            )
        except Exception as exc:  # jinja templates raise their own exception types
            raise ValueError(
                f"format_prompts: the chat template rejected prompt {i} of "
                f"{prompt_set.source} ({exc})"
            ) from exc
    return texts
