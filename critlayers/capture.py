"""Capturing the output of every transformer block with forward hooks.

The critical-layer method (Liu et al. 2025, arXiv:2506.00382, §1) compares, for every pair of
blocks l and j, the matrices X_l (n, d) of block outputs (the residual stream after block l,
before any final norm) at one token per prompt. :func:`iter_block_states` runs batched forward
passes and yields those states batch by batch, so that a consumer can stream them into a CKA
accumulator without holding every token of every prompt.

Batches are left-padded and given explicit position ids counted over real tokens only, so each
prompt sees exactly the positions it would see alone: batched results equal one-prompt-at-a-time
results within float32 noise, for rotary and absolute position embeddings alike.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Iterator, Sequence

import torch

from .models import context_length, find_blocks

__all__ = ["TOKEN_MODES", "BlockCapture", "count_prompt_tokens", "iter_block_states"]

logger = logging.getLogger(__name__)

TOKEN_MODES = ("last", "mean", "all")


def _hidden(output, name: str) -> torch.Tensor:
    """The hidden state in a block's output: the tensor itself or element 0 of a tuple."""
    if isinstance(output, torch.Tensor):
        hidden = output
    elif isinstance(output, (tuple, list)) and output:
        hidden = output[0]
    elif hasattr(output, "last_hidden_state"):
        hidden = output.last_hidden_state
    else:
        hidden = None
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        kind = type(hidden).__name__ if hidden is not None else type(output).__name__
        raise RuntimeError(
            f"BlockCapture: block {name!r} returned {kind}, not a (batch, seq, d) hidden state "
            "or a tuple starting with one"
        )
    return hidden


class BlockCapture:
    """Context manager that hooks a list of blocks and records one state per block per pass.

    Inside the ``with`` statement, call :meth:`begin` with the attention mask of the batch
    before each forward pass and :meth:`collect` after it. Each hook reduces its block's output
    (b, seq, d) to the selected token rows at once, so full activations are never kept:

    * ``"last"``: (b, d), the last real token of each row;
    * ``"mean"``: (b, d), the mean over real tokens (the attention mask excludes padding);
    * ``"all"``: (t, d) with t the number of real tokens in the batch, row by row.

    Args:
        blocks: ``(name, module)`` pairs, as returned by :func:`critlayers.models.find_blocks`.
        token: One of ``"last"``, ``"mean"``, ``"all"``.
        include_input: Also record the input of the first block (the embedding output), which
            then comes first in :meth:`collect`.

    Raises:
        RuntimeError: From the forward pass if a block fires twice in one pass; from
            :meth:`collect` if a block did not fire.
    """

    def __init__(
        self,
        blocks: Sequence[tuple[str, torch.nn.Module]],
        *,
        token: str = "last",
        include_input: bool = False,
    ):
        if token not in TOKEN_MODES:
            raise ValueError(f"BlockCapture: token={token!r} is not one of {TOKEN_MODES}")
        blocks = list(blocks)
        if not blocks:
            raise ValueError("BlockCapture: blocks is empty; expected at least one block")
        self.blocks = blocks
        self.token = token
        self.include_input = include_input
        names = [name for name, _ in blocks]
        if include_input:
            names = [f"{names[0]}:input", *names]
        self.names = names
        self._handles: list = []
        self._mask: torch.Tensor | None = None
        self._per_device: dict[torch.device, tuple[torch.Tensor, ...]] = {}
        self._states: list[torch.Tensor | None] = [None] * len(names)

    def __enter__(self) -> BlockCapture:
        offset = 1 if self.include_input else 0
        try:
            if self.include_input:
                module = self.blocks[0][1]
                self._handles.append(
                    module.register_forward_pre_hook(self._make_pre_hook(0), with_kwargs=True)
                )
            for i, (_name, module) in enumerate(self.blocks):
                self._handles.append(module.register_forward_hook(self._make_hook(i + offset)))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self._remove()
        self._mask = None
        self._per_device.clear()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def begin(self, attention_mask: torch.Tensor) -> None:
        """Start a forward pass over a batch with this (b, seq) attention mask (1 = real)."""
        if attention_mask.dim() != 2:
            raise ValueError(
                f"BlockCapture.begin: attention_mask has shape {tuple(attention_mask.shape)}; "
                "expected (batch, seq)"
            )
        self._mask = attention_mask.bool()
        self._per_device.clear()
        self._states = [None] * len(self.names)

    def collect(self) -> list[torch.Tensor]:
        """The states recorded in the last forward pass, as float32 CPU tensors in block order.

        Raises:
            RuntimeError: If a block did not fire during the pass.
        """
        missing = [
            name for name, state in zip(self.names, self._states, strict=True) if state is None
        ]
        if missing:
            raise RuntimeError(
                f"BlockCapture: block {missing[0]!r} did not fire during the forward pass"
                + (f" (nor did {len(missing) - 1} more)" if len(missing) > 1 else "")
                + "; is it part of the model's forward path?"
            )
        states = [s.to(device="cpu", dtype=torch.float32) for s in self._states]
        self._states = [None] * len(self.names)
        return states

    def _selectors(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The mask and derived indices, moved to ``device`` once per pass and device."""
        cached = self._per_device.get(device)
        if cached is None:
            mask = self._mask.to(device)
            seq = mask.shape[1]
            positions = torch.arange(seq, device=device)
            # Index of the last real token of each row, whatever side the padding is on.
            last = torch.where(mask, positions, -1).amax(dim=1)
            counts = mask.sum(dim=1, keepdim=True)
            cached = (mask, last, counts)
            self._per_device[device] = cached
        return cached

    def _reduce(self, hidden: torch.Tensor, name: str) -> torch.Tensor:
        if self._mask is None:
            raise RuntimeError(
                f"BlockCapture: block {name!r} fired before begin() set the attention mask"
            )
        if hidden.shape[:2] != self._mask.shape:
            raise RuntimeError(
                f"BlockCapture: block {name!r} produced a state of shape {tuple(hidden.shape)}, "
                f"which does not match the attention mask {tuple(self._mask.shape)}"
            )
        mask, last, counts = self._selectors(hidden.device)
        if self.token == "last":
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            return hidden[rows, last]
        if self.token == "all":
            return hidden[mask]
        # Padded rows may hold NaN (attention over nothing), so zero them rather than multiply.
        summed = torch.where(mask.unsqueeze(-1), hidden, 0).sum(dim=1, dtype=torch.float32)
        return summed / counts.clamp(min=1)

    def _store(self, index: int, state: torch.Tensor) -> None:
        if self._states[index] is not None:
            raise RuntimeError(
                f"BlockCapture: block {self.names[index]!r} fired more than once in one forward "
                "pass; each block must run exactly once (is a module shared between layers?)"
            )
        self._states[index] = state.detach()

    def _make_hook(self, index: int):
        name = self.names[index]

        def hook(module, args, output):
            self._store(index, self._reduce(_hidden(output, name), name))

        return hook

    def _make_pre_hook(self, index: int):
        name = self.names[index]

        def pre_hook(module, args, kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states")
            if not isinstance(hidden, torch.Tensor):
                raise RuntimeError(
                    f"BlockCapture: could not find the input hidden state of {name!r} "
                    "(neither a first positional argument nor hidden_states=)"
                )
            self._store(index, self._reduce(hidden, name))

        return pre_hook


def _tokenize(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids per text, adding special tokens unless the text already starts with BOS.

    Chat templates usually write the BOS token into the text; adding it again would feed the
    model a doubled BOS.
    """
    bos = getattr(tokenizer, "bos_token", None)
    with_special, without = [], []
    for i, text in enumerate(texts):
        (without if bos and text.startswith(bos) else with_special).append(i)
    ids: list[list[int] | None] = [None] * len(texts)
    for indices, add in ((with_special, True), (without, False)):
        if indices:
            encoded = tokenizer([texts[i] for i in indices], add_special_tokens=add)["input_ids"]
            for i, row in zip(indices, encoded, strict=True):
                ids[i] = list(row)
    return ids


def count_prompt_tokens(tokenizer, texts: Sequence[str]) -> list[int]:
    """Number of tokens of each text as :func:`iter_block_states` feeds it (before truncation)."""
    return [len(row) for row in _tokenize(tokenizer, list(texts))]


def _truncate(ids: list[int], limit: int, special: set[int]) -> list[int]:
    """Keep the end of the prompt (so its last token is real), and a leading special token."""
    if len(ids) <= limit:
        return ids
    if limit > 1 and ids[0] in special:
        return [ids[0], *ids[len(ids) - limit + 1 :]]
    return ids[len(ids) - limit :]


def _input_device(model: torch.nn.Module) -> torch.device:
    getter = getattr(model, "get_input_embeddings", None)
    if getter is not None:
        try:
            embedding = getter()
        except (NotImplementedError, AttributeError):
            embedding = None
        weight = getattr(embedding, "weight", None)
        if isinstance(weight, torch.Tensor):
            return weight.device
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _forward_target(model: torch.nn.Module, blocks) -> torch.nn.Module:
    """The backbone when it holds every block: it skips the language-model head."""
    base = getattr(model, "base_model", None)
    if isinstance(base, torch.nn.Module) and base is not model:
        inside = {id(m) for m in base.modules()}
        if all(id(module) in inside for _, module in blocks):
            return base
    return model


def _accepts(module: torch.nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def iter_block_states(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    blocks: Sequence[tuple[str, torch.nn.Module]] | None = None,
    token: str = "last",
    batch_size: int = 8,
    max_length: int | None = None,
    include_input: bool = False,
    progress: bool = True,
) -> Iterator[list[torch.Tensor]]:
    """Run the prompts through the model in batches and yield every block's states per batch.

    Each batch is tokenised, left-padded, given position ids that count real tokens only and
    run under ``torch.inference_mode``. The yielded list holds one float32 CPU tensor per block
    in block order (preceded by the first block's input when ``include_input``):

    * ``token="last"``: (b, d), the state at the last prompt token (the paper's choice);
    * ``token="mean"``: (b, d), the mean over the real tokens of each prompt;
    * ``token="all"``: (t, d), every real token of the batch, prompt by prompt, with t the
      total number of real tokens; padding is excluded.

    Args:
        model: A transformers model (or any module whose forward accepts ``input_ids`` and
            ``attention_mask``), on CPU, CUDA, or dispatched with an accelerate ``device_map``.
        tokenizer: Its tokenizer. Only ``__call__``, ``bos_token`` and the pad/eos ids are used;
            its own padding side does not matter.
        texts: The prompts, already formatted (see :func:`critlayers.prompts.format_prompts`).
        blocks: ``(name, module)`` pairs from :func:`critlayers.models.find_blocks`; ``None``
            finds them automatically.
        token: Which token state(s) to keep: ``"last"``, ``"mean"`` or ``"all"``.
        batch_size: Prompts per forward pass.
        max_length: Longest input in tokens; longer prompts keep their end (and a leading
            special token such as BOS). Defaults to the model's context length.
        include_input: Also yield the input of the first block (the embedding output) first.
        progress: Show a progress bar over the prompts.

    Yields:
        ``n_layers`` (or ``n_layers + 1``) float32 CPU tensors per batch, in prompt order.

    Raises:
        ValueError: On an empty prompt list, an unknown ``token`` or a bad ``batch_size`` or
            ``max_length``.
        RuntimeError: If a block never fires or fires more than once in a forward pass.

    Note:
        Hooks are registered for each forward pass and removed before the batch is yielded, so
        an abandoned iterator leaves none behind. The model is switched to eval mode during each
        pass and restored afterwards. Prompts longer than ``max_length`` trigger a single
        warning that counts them.
    """
    if token not in TOKEN_MODES:
        raise ValueError(f"iter_block_states: token={token!r} is not one of {TOKEN_MODES}")
    if isinstance(texts, str):
        raise ValueError("iter_block_states: texts is a single string; pass a list of prompts")
    texts = list(texts)
    if not texts:
        raise ValueError("iter_block_states: texts is empty; expected at least one prompt")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise ValueError(
            f"iter_block_states: texts[{bad[0]}] is {type(texts[bad[0]]).__name__}, not str"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"iter_block_states: batch_size={batch_size!r}; expected an int >= 1")
    limit = max_length if max_length is not None else context_length(model)
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"iter_block_states: max_length={max_length!r}; expected an int >= 1")
    blocks = find_blocks(model) if blocks is None else list(blocks)

    ids = _tokenize(tokenizer, texts)
    empty = [i for i, row in enumerate(ids) if not row]
    if empty:
        raise ValueError(
            f"iter_block_states: prompt {empty[0]} tokenises to nothing; remove empty prompts"
        )
    if limit is not None:
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        n_truncated = sum(len(row) > limit for row in ids)
        if n_truncated:
            warnings.warn(
                f"iter_block_states: {n_truncated} of {len(ids)} prompts were longer than "
                f"max_length={limit} tokens and were truncated, keeping their end",
                stacklevel=2,
            )
            ids = [_truncate(row, limit, special) for row in ids]

    target = _forward_target(model, blocks)
    device = _input_device(model)
    pad_id = _pad_id(tokenizer)
    extra: dict = {}
    pass_positions = _accepts(target, "position_ids")
    if _accepts(target, "use_cache"):
        extra["use_cache"] = False
    if not pass_positions:
        logger.debug("%s takes no position_ids; padding may shift positions", type(target))

    from tqdm.auto import tqdm

    bar = tqdm(total=len(ids), desc="forward passes", unit="prompt", disable=not progress)
    capture = BlockCapture(blocks, token=token, include_input=include_input)
    try:
        for start in range(0, len(ids), batch_size):
            rows = ids[start : start + batch_size]
            width = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, row in enumerate(rows):
                input_ids[r, width - len(row) :] = torch.tensor(row, dtype=torch.long)
                mask[r, width - len(row) :] = 1
            inputs = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}
            if pass_positions:
                positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
                inputs["position_ids"] = positions.to(device)
            was_training = model.training
            model.eval()
            try:
                with capture, torch.inference_mode():
                    capture.begin(mask)
                    target(**inputs, **extra)
                    states = capture.collect()
            finally:
                model.train(was_training)
            bar.update(len(rows))
            yield states
    finally:
        bar.close()
