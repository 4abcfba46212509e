"""Tests of block capture on tiny randomly initialised models of several families."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import (
    FAMILIES,
    SAMPLE_TEXTS,
    ToyModel,
    expected_depth,
    final_norm,
    hidden_states_reference,
    make_model,
    make_tokenizer,
    single_thread,
)

from critlayers.capture import BlockCapture, count_prompt_tokens, iter_block_states
from critlayers.models import find_blocks

ATOL = 1e-5


def run(model, tokenizer, texts, **kwargs) -> list[torch.Tensor]:
    """All batches of iter_block_states concatenated along the row axis, one tensor per block."""
    kwargs.setdefault("progress", False)
    batches = list(iter_block_states(model, tokenizer, texts, **kwargs))
    return [torch.cat(parts) for parts in zip(*batches, strict=True)]


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    scale = max(1.0, b.abs().max().item())
    err = (a - b).abs().max().item()
    assert err <= ATOL * scale, f"{what}: max abs error {err:.3g} (scale {scale:.3g})"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.mark.parametrize("family", FAMILIES)
def test_find_blocks_finds_every_block(family):
    model = make_model(family)
    blocks = find_blocks(model)
    assert len(blocks) == expected_depth(family)
    names = [name for name, _ in blocks]
    prefix = names[0].rsplit(".", 1)[0]
    assert names == [f"{prefix}.{i}" for i in range(len(blocks))]
    assert len({type(m) for _, m in blocks}) == 1


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("token", ["last", "mean"])
def test_batched_equals_unbatched(family, token, tokenizer):
    model = make_model(family)
    one = run(model, tokenizer, SAMPLE_TEXTS, token=token, batch_size=1)
    batched = run(model, tokenizer, SAMPLE_TEXTS, token=token, batch_size=3)
    assert len(one) == expected_depth(family)
    for layer, (a, b) in enumerate(zip(batched, one, strict=True)):
        assert a.shape == (len(SAMPLE_TEXTS), model.config.hidden_size)
        assert a.dtype == torch.float32 and a.device.type == "cpu"
        assert_close(a, b, f"{family} block {layer}")


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_output_hidden_states(family, tokenizer):
    """Every token of every block equals transformers' own hidden states for one prompt.

    ``hidden_states[l + 1]`` is block l's output for all but the last block; the last entry
    has the final norm applied, so the captured last block is compared through that norm.
    """
    model = make_model(family)
    texts = SAMPLE_TEXTS[:5]
    states = run(model, tokenizer, texts, token="all", batch_size=5, include_input=True)
    last = run(model, tokenizer, texts, token="last", batch_size=5)
    mean = run(model, tokenizer, texts, token="mean", batch_size=5)
    n_layers = expected_depth(family)
    assert len(states) == n_layers + 1
    refs = [hidden_states_reference(model, tokenizer, t) for t in texts]
    assert all(len(r) == n_layers + 1 for r in refs)
    with torch.inference_mode():
        for k in range(n_layers + 1):
            expected = torch.cat([r[k] for r in refs])
            got = states[k]
            if k == n_layers:
                got = final_norm(model)(got)
            assert got.shape == expected.shape
            assert_close(got, expected, f"{family} hidden state {k}")
        for layer in range(n_layers - 1):
            want_last = torch.stack([r[layer + 1][-1] for r in refs])
            want_mean = torch.stack([r[layer + 1].mean(0) for r in refs])
            assert_close(last[layer], want_last, f"{family} last, block {layer}")
            assert_close(mean[layer], want_mean, f"{family} mean, block {layer}")


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("token", ["last", "mean", "all"])
def test_padding_never_leaks(family, token):
    model = make_model(family)
    text = SAMPLE_TEXTS[2]
    short = ["name a tree", "list three good books"]
    long = ["explain why the sky is blue " * 4, "write a short poem about the moon " * 3]
    reference = run(model, make_tokenizer(), [text], token=token)
    for pad in ("[PAD]", "[EOS]", "[UNK]"):
        tok = make_tokenizer()
        tok.pad_token = pad
        for company in (short, long):
            states = run(model, tok, [company[0], text, company[1]], token=token, batch_size=3)
            n_first = count_prompt_tokens(tok, [company[0]])[0] if token == "all" else 1
            rows = slice(n_first, n_first + reference[0].shape[0])
            for layer, (got, want) in enumerate(zip(states, reference, strict=True)):
                assert_close(got[rows], want, f"{family} pad={pad} block {layer}")


@pytest.mark.parametrize("family", ["qwen3", "gemma3", "gpt_neox"])
def test_all_yields_exactly_the_real_tokens(family, tokenizer):
    model = make_model(family)
    counts = count_prompt_tokens(tokenizer, SAMPLE_TEXTS)
    batches = list(
        iter_block_states(model, tokenizer, SAMPLE_TEXTS, token="all", batch_size=3, progress=False)
    )
    for i, batch in enumerate(batches):
        want = sum(counts[3 * i : 3 * i + 3])
        assert all(s.shape == (want, model.config.hidden_size) for s in batch)


def test_last_token_is_last_prompt_token_whatever_the_tokenizer_padding_side():
    model = make_model("llama")
    left = run(model, make_tokenizer(padding_side="left"), SAMPLE_TEXTS, batch_size=4)
    right = run(model, make_tokenizer(padding_side="right"), SAMPLE_TEXTS, batch_size=4)
    for a, b in zip(left, right, strict=True):
        assert torch.equal(a, b)


def test_include_input_is_the_embedding_output(tokenizer):
    model = make_model("gemma3")
    states = run(model, tokenizer, SAMPLE_TEXTS[:3], token="last", include_input=True)
    refs = [hidden_states_reference(model, tokenizer, t) for t in SAMPLE_TEXTS[:3]]
    assert_close(states[0], torch.stack([r[0][-1] for r in refs]), "embedding output")


@pytest.mark.parametrize("return_tuple", [False, True])
def test_tuple_and_bare_tensor_outputs(return_tuple, tokenizer):
    model = ToyModel(return_tuple=return_tuple).eval()
    bare = ToyModel(return_tuple=False).eval()
    got = run(model, tokenizer, SAMPLE_TEXTS, batch_size=3)
    want = run(bare, tokenizer, SAMPLE_TEXTS, batch_size=1)
    assert len(got) == 3
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, f"return_tuple={return_tuple}")


def test_block_that_never_fires_is_named(tokenizer):
    model = ToyModel(skip=1).eval()
    with pytest.raises(RuntimeError, match=r"'layers\.1' did not fire"):
        run(model, tokenizer, SAMPLE_TEXTS[:2])


def test_block_outside_the_model_is_named(tokenizer):
    model = make_model("llama")
    blocks = [*find_blocks(model), ("ghost", torch.nn.Linear(4, 4))]
    with pytest.raises(RuntimeError, match="'ghost' did not fire"):
        run(model, tokenizer, SAMPLE_TEXTS[:2], blocks=blocks)


def test_block_that_fires_twice_is_named(tokenizer):
    model = ToyModel(repeat=2).eval()
    with pytest.raises(RuntimeError, match=r"'layers\.2' fired more than once"):
        run(model, tokenizer, SAMPLE_TEXTS[:2])


def _hook_counts(blocks) -> list[tuple[int, int]]:
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for _, m in blocks]


def test_hooks_are_removed_and_mode_restored(tokenizer):
    model = make_model("phi3")
    blocks = find_blocks(model)
    before = _hook_counts(blocks)  # transformers may keep hooks of its own on the blocks
    model.train()
    try:
        run(model, tokenizer, SAMPLE_TEXTS[:2], include_input=True)
        assert model.training
    finally:
        model.eval()
    assert _hook_counts(blocks) == before
    abandoned = iter_block_states(model, tokenizer, SAMPLE_TEXTS, batch_size=2, progress=False)
    next(abandoned)
    assert _hook_counts(blocks) == before
    toy = ToyModel(skip=0).eval()
    with pytest.raises(RuntimeError, match="did not fire"):
        run(toy, tokenizer, SAMPLE_TEXTS[:1])
    assert _hook_counts(find_blocks(toy)) == [(0, 0)] * 3


def test_truncation_keeps_the_end_and_warns_once_with_a_count():
    tokenizer = make_tokenizer()
    model = make_model("gpt2")
    texts = ["name a tree", "one two three four five six seven eight nine ten", "a b"]
    with pytest.warns(UserWarning, match=r"1 of 3 prompts were longer than max_length=6") as rec:
        got = run(model, tokenizer, texts, max_length=6)
    assert len([w for w in rec if "truncated" in str(w.message)]) == 1
    # BOS is kept, then the last five words.
    want = run(model, tokenizer, ["[BOS] six seven eight nine ten"], batch_size=1)
    for a, b in zip(got, want, strict=True):
        assert_close(a[1:2], b, "truncated prompt")


def test_context_length_is_the_default_limit(tokenizer):
    model = make_model("llama")
    text = " ".join(["word"] * 200)
    with pytest.warns(UserWarning, match=r"max_length=128"):
        run(model, tokenizer, [text])


def test_no_warning_without_truncation(tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(make_model("qwen2"), tokenizer, SAMPLE_TEXTS)


def test_bos_is_not_doubled_for_templated_text():
    tokenizer = make_tokenizer(chat_template=True)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "name a tree"}], tokenize=False, add_generation_prompt=True
    )
    assert text.startswith("[BOS]")
    assert count_prompt_tokens(tokenizer, [text]) == [len(tokenizer(text)["input_ids"]) - 1]


def test_low_precision_models_give_float32_states(tokenizer):
    model = make_model("llama")
    half = type(model)(model.config).to(torch.bfloat16).eval()
    half.load_state_dict(model.state_dict())
    got = run(half, tokenizer, SAMPLE_TEXTS, batch_size=4)
    one = run(half, tokenizer, SAMPLE_TEXTS, batch_size=1)
    want = run(model, tokenizer, SAMPLE_TEXTS, batch_size=4)
    for a, b, c in zip(got, one, want, strict=True):
        assert a.dtype == torch.float32
        assert (a - c).abs().max() <= 0.05 * c.abs().max()
        assert (a - b).abs().max() <= 0.05 * b.abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("token", ["last", "mean", "all"])
def test_cuda_matches_cpu(token, tokenizer):
    model = make_model("qwen3")
    want = run(model, tokenizer, SAMPLE_TEXTS, token=token, batch_size=3)
    gpu = type(model)(model.config).eval()
    gpu.load_state_dict(model.state_dict())
    gpu = gpu.to("cuda")
    got = run(gpu, tokenizer, SAMPLE_TEXTS, token=token, batch_size=3)
    for a, b in zip(got, want, strict=True):
        assert a.device.type == "cpu" and a.dtype == torch.float32
        assert (a - b).abs().max() <= 1e-3 * max(1.0, b.abs().max().item())


def test_accelerate_dispatched_model(tokenizer):
    accelerate = pytest.importorskip("accelerate")
    model = make_model("llama")
    want = run(model, tokenizer, SAMPLE_TEXTS, batch_size=3)
    copy = type(model)(model.config).eval()
    copy.load_state_dict(model.state_dict())
    device_map = {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu"}
    device_map.update({"model.rotary_emb": "cpu", "lm_head": "cpu"})
    dispatched = accelerate.dispatch_model(copy, device_map=device_map)
    got = run(dispatched, tokenizer, SAMPLE_TEXTS, batch_size=3)
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, "dispatched")


def test_block_capture_context_manager(tokenizer):
    model = make_model("mistral")
    blocks = find_blocks(model)
    enc = tokenizer(SAMPLE_TEXTS[:2], return_tensors="pt", padding=True)
    before = _hook_counts(blocks)
    with BlockCapture(blocks, token="mean") as capture, torch.inference_mode():
        assert [h for h, _ in _hook_counts(blocks)] == [h + 1 for h, _ in before]
        capture.begin(enc["attention_mask"])
        model(**enc)
        states = capture.collect()
    assert _hook_counts(blocks) == before
    assert [s.shape for s in states] == [(2, 32)] * 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"token": "first"}, r"iter_block_states: token='first'"),
        ({"batch_size": 0}, r"iter_block_states: batch_size=0"),
        ({"max_length": 0}, r"iter_block_states: max_length=0"),
    ],
)
def test_bad_arguments_are_named(kwargs, match, tokenizer):
    with pytest.raises(ValueError, match=match):
        run(make_model("llama"), tokenizer, SAMPLE_TEXTS, **kwargs)


def test_bad_texts_are_named(tokenizer):
    model = make_model("llama")
    with pytest.raises(ValueError, match="texts is empty"):
        run(model, tokenizer, [])
    with pytest.raises(ValueError, match="single string"):
        run(model, tokenizer, "name a tree")
    with pytest.raises(ValueError, match=r"texts\[1\] is int"):
        run(model, tokenizer, ["name a tree", 3])
