"""Model files → `torch.nn.Module`s, without ever unpickling Python objects.

Formats (API.md "Models"):
- `torchscript`: a `torch.jit.save` zip archive, read by TorchScript's own loader (its
  unpickler only rebuilds tensors and TorchScript classes; it cannot call Python). Plain
  `torch.save` pickles are refused before anything reads them.
- `hf`: a `save_pretrained` folder (`config.json` + `model.safetensors`), built with
  `AutoModelForSequenceClassification` (classification/regression) or
  `AutoModelForCausalLM` (causal_lm) from the local folder only, never with remote code.
  A folder holding only `pytorch_model.bin` is read with `weights_only=True` (tensors only).
- `safetensors`: a weights file plus an `architecture` entry point `package.module:callable`
  that the operator allowlisted (`ALLOWED_ARCHITECTURES`); the callable builds the module and
  the weights are loaded with `strict=True`.
- `auto`: sniffed (folder with config.json → hf, TorchScript zip → torchscript,
  safetensors header → safetensors).
"""

from __future__ import annotations

import importlib
import json
import logging
import struct
import threading
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from attribution.device import resolve_device
from attribution.model import ModelAdapter
from attribution.structure import ModelStructure
from attribution.tasks import TaskName, task_for
from loading.errors import ModelLoadError
from loading.hashing import cached_sha256, path_sha256
from loading.uris import resolve_uri
from service.settings import Settings

log = logging.getLogger(__name__)

FORMATS = ("torchscript", "hf", "safetensors", "auto")


@dataclass(frozen=True)
class ModelInfo:
    """What registration stores about a model: the resolved format, content hash, size, and its
    structure (trainable parameters, what K-FAC can factor) for checks at query submission."""

    format: str
    sha256: str
    num_parameters: int
    structure: dict[str, Any]  # `attribution.structure.ModelStructure.to_dict()`


def inspect_model(
    path: Path, format: str, task: str, *, architecture: str | None, allowlist: list[str]
) -> ModelInfo:
    """Load the model once to validate it; `ModelLoadError` (field `uri`/`format`/`architecture`) if it does not."""
    resolved = sniff_format(path) if format == "auto" else format
    module = build_module(path, resolved, task, architecture=architecture, allowlist=allowlist)
    num_parameters = sum(p.numel() for p in module.parameters())
    if num_parameters == 0:
        raise ModelLoadError("uri", "the model has no parameters to attribute through")
    return ModelInfo(format=resolved, sha256=path_sha256(path), num_parameters=int(num_parameters),
                     structure=ModelStructure.of_module(module).to_dict())


def sniff_format(path: Path) -> str:
    """`hf`, `torchscript` or `safetensors` from the file's structure, never its extension alone."""
    if path.is_dir():
        if (path / "config.json").is_file():
            return "hf"
        raise ModelLoadError("uri", "a folder model needs a config.json (Hugging Face save_pretrained layout)")
    if zipfile.is_zipfile(path):
        if _is_torchscript_zip(path):
            return "torchscript"
        raise ModelLoadError(
            "uri", "the zip archive is not a TorchScript module (torch.save pickles are refused; "
            "export with torch.jit.script/trace and torch.jit.save, or save weights as safetensors)"
        )
    if _looks_like_safetensors(path):
        return "safetensors"
    raise ModelLoadError("uri", "cannot recognise the model file (expected a TorchScript archive, "
                                "a safetensors file or a Hugging Face folder)")


def build_module(
    path: Path, format: str, task: str, *, architecture: str | None, allowlist: list[str]
) -> torch.nn.Module:
    """The module in eval mode on CPU, float32; raises `ModelLoadError` with the reason."""
    try:
        TaskName(task)
    except ValueError:
        raise ModelLoadError("task", f"unknown task {task!r}; valid: {', '.join(t.value for t in TaskName)}") from None
    if format == "torchscript":
        module = _load_torchscript(path)
    elif format == "hf":
        module = _load_hf(path, task)
    elif format == "safetensors":
        module = _load_safetensors(path, architecture, allowlist)
    elif format == "auto":
        return build_module(path, sniff_format(path), task, architecture=architecture, allowlist=allowlist)
    else:
        raise ModelLoadError("format", f"unknown format {format!r}; valid: {', '.join(FORMATS)}")
    return module.float().eval()


# --------------------------------------------------------------------- torchscript
def _is_torchscript_zip(path: Path) -> bool:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    has_constants = any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in names)
    has_code = any("/code/" in n or n.startswith("code/") for n in names)
    return has_constants and has_code


def _load_torchscript(path: Path) -> torch.nn.Module:
    if path.is_dir() or not zipfile.is_zipfile(path):
        raise ModelLoadError("uri", "not a TorchScript archive (expected the zip written by torch.jit.save)")
    if not _is_torchscript_zip(path):
        raise ModelLoadError(
            "uri", "the zip archive is a torch.save pickle, not a TorchScript module; pickles are "
            "refused because loading them can run code (use torch.jit.save or safetensors)"
        )
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise ModelLoadError("uri", f"TorchScript archive does not load: {_first_line(exc)}") from None


# --------------------------------------------------------------------- safetensors
def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file starts with a little-endian u64 header length and a JSON object."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
            size = path.stat().st_size
    except OSError:
        return False
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return 0 < header_len <= size - 8 and head[8:9] == b"{"


def _load_safetensors(path: Path, architecture: str | None, allowlist: list[str]) -> torch.nn.Module:
    from safetensors.torch import load_file

    if not architecture:
        raise ModelLoadError("architecture", "format safetensors needs an architecture entry point 'package.module:callable'")
    if architecture not in allowlist:
        allowed = ", ".join(allowlist) if allowlist else "none configured"
        raise ModelLoadError("architecture", f"{architecture!r} is not in the server's allowlist ({allowed})")
    module_name, sep, attr = architecture.partition(":")
    if not sep or not module_name or not attr:
        raise ModelLoadError("architecture", "must look like 'package.module:callable'")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
        module = factory()
    except Exception as exc:
        raise ModelLoadError("architecture", f"cannot build {architecture}: {_first_line(exc)}") from None
    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError("architecture", f"{architecture} returned {type(module).__name__}, not a torch.nn.Module")
    if path.is_dir() or not _looks_like_safetensors(path):
        raise ModelLoadError("uri", "not a safetensors file")
    try:
        state = load_file(str(path), device="cpu")
        module.load_state_dict(state, strict=True)
    except Exception as exc:
        raise ModelLoadError("uri", f"weights do not fit {architecture}: {_first_line(exc)}") from None
    return module


# --------------------------------------------------------------------- hugging face
# transformers resolves its classes and modeling modules lazily on first access, which is not
# thread-safe: in embedded mode the API thread registering a folder and the in-process worker
# loading one at the same moment saw `module 'transformers' has no attribute
# 'AutoModelForCausalLM'` (a 500 at POST /v1/models). One lock per process serialises the
# imports and loads of models and tokenizers.
_TRANSFORMERS_LOADING = threading.RLock()


def _load_hf(path: Path, task: str) -> torch.nn.Module:
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ModelLoadError("uri", "format hf needs a save_pretrained folder with config.json")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError("uri", f"config.json is not valid JSON: {_first_line(exc)}") from None
    if isinstance(config, dict) and config.get("auto_map"):
        raise ModelLoadError("uri", "the config requires custom remote code (auto_map), which the server never runs")
    has_safetensors = any(path.glob("*.safetensors"))
    has_bin = any(path.glob("*.bin"))
    if not has_safetensors and not has_bin:
        raise ModelLoadError("uri", "the folder has no model weights (model.safetensors)")
    with _TRANSFORMERS_LOADING:
        try:
            import transformers
        except ImportError:
            raise ModelLoadError("format", "format hf needs the transformers package on the worker") from None
        auto = (transformers.AutoModelForCausalLM if task == TaskName.CAUSAL_LM
                else transformers.AutoModelForSequenceClassification)
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False,
                              "use_safetensors": has_safetensors, "dtype": torch.float32,
                              "attn_implementation": attention_implementation(config)}
    if not has_safetensors:
        kwargs["weights_only"] = True  # pytorch_model.bin: tensors only, never Python objects
    try:
        with _TRANSFORMERS_LOADING:
            module = auto.from_pretrained(str(path), **kwargs)
    except Exception as exc:
        if type(exc).__name__ == "UnpicklingError":
            raise ModelLoadError("uri", "the .bin weights hold Python objects besides tensors and were refused "
                                        "(loading them could run code); save the model with safetensors") from None
        raise ModelLoadError("uri", f"Hugging Face folder does not load as {auto.__name__}: {_first_line(exc)}") from None
    return module


def attention_implementation(config: Any) -> str:
    """The attention kernel a folder is loaded with: its own choice when it is `eager` or `sdpa`,
    else `sdpa` (FlashAttention and other CUDA-only kernels from a GPU training run do not load
    on every worker). `ModelAdapter` then switches Hugging Face modules to eager attention,
    the kernel every `torch.func` transform and double backward goes through."""
    requested = None
    if isinstance(config, dict):
        requested = config.get("attn_implementation") or config.get("_attn_implementation")
    return requested if requested in ("eager", "sdpa") else "sdpa"


_GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _saved_tokenizer_class(path: Path) -> str | None:
    try:
        config = json.loads((path / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("tokenizer_class") if isinstance(config, dict) else None
    return value if isinstance(value, str) else None


def load_tokenizer_from(path: Path) -> Any:
    """The folder's tokenizer (local files only), with a pad token; `None` if the folder has none."""
    if not path.is_dir() or not any((path / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        return None
    try:
        with _TRANSFORMERS_LOADING:
            from transformers import AutoTokenizer, PreTrainedTokenizerFast

        # A folder whose tokenizer was saved as a plain `tokenizers` tokenizer (a custom
        # vocabulary) is read as saved; AutoTokenizer would pick the architecture's own
        # tokenizer class from config.json (e.g. Qwen2's) and re-interpret tokenizer.json.
        loader = PreTrainedTokenizerFast if _saved_tokenizer_class(path) in _GENERIC_TOKENIZERS else AutoTokenizer
        with _TRANSFORMERS_LOADING:
            tokenizer = loader.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise ModelLoadError("uri", f"the folder's tokenizer does not load: {_first_line(exc)}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError("uri", "the tokenizer has neither a pad nor an eos token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # batches are right-padded (see loading.model_inputs)
    return tokenizer


# --------------------------------------------------------------------- registered models
MODELS_KEPT = 4  # built modules (and, separately, tokenizers) kept per process


@lru_cache(maxsize=MODELS_KEPT)
def _built_model(path: Path, sha256: str, device: str, fmt: str, task: str, architecture: str | None,
                 allowlist: tuple[str, ...]) -> ModelAdapter:
    """The module of one registered model version (`sha256`) on `device`, built once per process."""
    log.info("loading model %s (%s) on %s", path, fmt, device)
    module = build_module(path, fmt, task, architecture=architecture, allowlist=list(allowlist))
    return ModelAdapter(module, task_for(task), device=torch.device(device))


@lru_cache(maxsize=MODELS_KEPT)
def _tokenizer(path: Path, sha256: str) -> Any:
    return load_tokenizer_from(path)


def verified_model_path(model_row: Any, settings: Settings) -> Path:
    """The registered model's path, checked to still hash to the registered sha256."""
    path = resolve_uri(model_row.uri, settings.data_root)
    current = cached_sha256(path)
    if current != model_row.sha256:
        raise ModelLoadError(
            "uri", f"model file changed since registration (sha256 {current[:12]}… != registered "
            f"{model_row.sha256[:12]}…); register it again"
        )
    return path


def load_model(model_row: Any, settings: Settings) -> ModelAdapter:
    """A `ModelAdapter` for a registered model row (cached per process by path and content hash)."""
    path = verified_model_path(model_row, settings)
    try:
        device = resolve_device(settings.device)
    except ValueError as exc:
        raise ModelLoadError("device", str(exc)) from None

    return _built_model(path, model_row.sha256, str(device), model_row.format, model_row.task,
                        model_row.architecture, tuple(settings.architecture_allowlist))


def load_tokenizer(model_row: Any, settings: Settings) -> Any:
    """The registered HF model's tokenizer, or `None` (other formats, or no tokenizer files)."""
    if model_row.format != "hf":
        return None
    path = verified_model_path(model_row, settings)
    return _tokenizer(path, model_row.sha256)


def clear_model_cache() -> None:
    _built_model.cache_clear()
    _tokenizer.cache_clear()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    message = text[0] if text else ""
    return f"{exc.__class__.__name__}: {message}"[:500] if message else exc.__class__.__name__
