"""Tiny randomly initialised transformers models and an offline tokenizer for the tests.

Every model is built from a config (2-3 blocks, width 32-64), so nothing is downloaded. The
tokenizer is a word-level ``tokenizers`` model wrapped in ``PreTrainedTokenizerFast``, with
pad, BOS, EOS and unknown tokens, and optionally a chat template.
"""

from __future__ import annotations

import contextlib
import functools

import torch

VOCAB_WORDS = (
    "the a an of to in and is are was be for on with as by it this that from at or not what how "
    "why when where which who explain describe write list give name summarise summarize compare "
    "translate rewrite sentence paragraph poem story email question answer number numbers sum "
    "add subtract multiply divide cat cats dog dogs bird tree river mountain city cities sun "
    "moon star water fire earth air light dark red green blue old new big small fast slow good "
    "bad happy sad one two three four five six seven eight nine ten hundred many few more less "
    "book books science history music art food apple bread coffee tea school teacher student "
    "computer program code function data model layer network language word words please short "
    "long simple clear three-sentence instruction input response user assistant system ? . , ! :"
).split()
SPECIAL = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
VOCAB_SIZE = 256


@contextlib.contextmanager
def single_thread():
    """Run with one intra-op thread: tiny models gain nothing from more, and on a busy machine
    extra threads make each small matmul many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . "
    "{% endfor %}{% if add_generation_prompt %}assistant :{% endif %}"
)


@functools.cache
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for word in VOCAB_WORDS:
        vocab.setdefault(word, len(vocab))
    assert len(vocab) <= VOCAB_SIZE
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", pair="[BOS] $A $B", special_tokens=[("[BOS]", vocab["[BOS]"])]
    )
    return tok.to_str()


def make_tokenizer(chat_template: bool = False, padding_side: str = "left"):
    """A fresh offline tokenizer; each call returns an independent object."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token="[BOS]",
        eos_token="[EOS]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        padding_side=padding_side,
        model_max_length=512,
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _configs() -> dict:
    import transformers as tf

    common = dict(vocab_size=VOCAB_SIZE, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    decoder = dict(
        common,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return {
        "llama": (tf.LlamaConfig, decoder),
        "mistral": (tf.MistralConfig, dict(decoder, sliding_window=None)),
        "qwen2": (tf.Qwen2Config, decoder),
        "qwen3": (tf.Qwen3Config, dict(decoder, head_dim=8)),
        "gemma3": (
            tf.Gemma3TextConfig,
            dict(decoder, head_dim=8, sliding_window=4, query_pre_attn_scalar=8),
        ),
        "phi3": (tf.Phi3Config, dict(decoder, num_key_value_heads=4)),
        "gpt2": (
            tf.GPT2Config,
            dict(common, n_embd=32, n_layer=3, n_head=4, n_positions=128, n_inner=64),
        ),
        "gpt_neox": (
            tf.GPTNeoXConfig,
            dict(
                common,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=3,
                num_attention_heads=4,
                max_position_embeddings=128,
            ),
        ),
        "bert": (
            tf.BertConfig,
            dict(
                common,
                hidden_size=48,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=128,
            ),
        ),
    }


FAMILIES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma3",
    "phi3",
    "gpt2",
    "gpt_neox",
    "bert",
)


def make_config(family: str):
    cls, kwargs = _configs()[family]
    return cls(**kwargs)


@functools.cache
def _cached_model(family: str) -> torch.nn.Module:
    from transformers import AutoModel, AutoModelForCausalLM

    config = make_config(family)
    torch.manual_seed(0)
    auto = AutoModel if family == "bert" else AutoModelForCausalLM
    model = auto.from_config(config, attn_implementation="eager")
    return model.eval()


def make_model(family: str) -> torch.nn.Module:
    """The tiny model of a family, in eval mode; cached, so treat it as read-only."""
    return _cached_model(family)


def expected_depth(family: str) -> int:
    config = make_config(family)
    return getattr(config, "num_hidden_layers", None) or config.n_layer


def final_norm(model: torch.nn.Module):
    """The norm applied after the last block (identity for models without one, like BERT)."""
    base = model.base_model
    for attr in ("norm", "ln_f", "final_layer_norm"):
        module = getattr(base, attr, None)
        if isinstance(module, torch.nn.Module):
            return module
    return torch.nn.Identity()


def hidden_states_reference(model, tokenizer, text: str) -> list[torch.Tensor]:
    """Per-block outputs (seq, d) for one unpadded prompt, from ``output_hidden_states=True``.

    ``hidden_states[l + 1]`` is the output of block l, except that transformers replaces the
    last entry by the output of the final norm; the last block's raw output is therefore not
    available here and its entry is the normed state. Compare through :func:`final_norm`.
    """
    ids = tokenizer([text], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model(input_ids=ids, output_hidden_states=True)
    return [h[0].float() for h in out.hidden_states]


SAMPLE_TEXTS = [
    "explain why the sky is blue",
    "write a short poem about the moon and the river",
    "what is the sum of two and three ?",
    "list three good books",
    "compare cats and dogs in one clear sentence , please",
    "translate this sentence",
    "how many cities are on the river ? give a short answer with numbers",
    "name a tree",
]


class ToyAttention(torch.nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.proj = torch.nn.Linear(d, d)

    def forward(self, x, attention_mask):
        # Causal mean over real positions: enough mixing to make padding leaks visible.
        seq = x.shape[1]
        allowed = torch.ones(seq, seq, dtype=torch.bool, device=x.device).tril()
        allowed = allowed & attention_mask.bool()[:, None, :]
        weights = allowed.float() / allowed.float().sum(-1, keepdim=True).clamp(min=1)
        return self.proj(weights @ x)


class ToyBlock(torch.nn.Module):
    """A residual block returning a bare tensor or a tuple, as configured."""

    def __init__(self, d: int, return_tuple: bool):
        super().__init__()
        self.attention = ToyAttention(d)
        self.return_tuple = return_tuple

    def forward(self, hidden_states, attention_mask):
        out = hidden_states + torch.tanh(self.attention(hidden_states, attention_mask))
        return (out, None) if self.return_tuple else out


class ToyModel(torch.nn.Module):
    """A model whose forward can skip a block or run one twice, for the capture error paths.

    It takes no ``position_ids`` and has no config, unlike transformers models.
    """

    def __init__(
        self,
        d: int = 16,
        n_layers: int = 3,
        return_tuple: bool = False,
        skip: int | None = None,
        repeat: int | None = None,
    ):
        super().__init__()
        torch.manual_seed(1)
        self.embed = torch.nn.Embedding(VOCAB_SIZE, d)
        self.layers = torch.nn.ModuleList(ToyBlock(d, return_tuple) for _ in range(n_layers))
        self.skip = skip
        self.repeat = repeat

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            if i == self.skip:
                continue
            for _ in range(2 if i == self.repeat else 1):
                out = layer(h, attention_mask)
                h = out[0] if isinstance(out, tuple) else out
        return h
