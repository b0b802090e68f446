"""Engine configuration: limits of the scheduler and the KV pool."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.quantization import QUANTIZATION_MODES

#: where weights come from (:func:`engine.loader.resolve`)
LOAD_FORMATS = ("auto", "dummy")


@dataclass
class EngineConfig:
    """Knobs that size the engine. ``None`` means "derive from the model/device".

    ``max_model_len``      longest prompt + output a request may have.
    ``max_running``        requests that hold KV slots at once (rows of req_to_token).
    ``max_batched_tokens`` token budget of one step (decodes + prefill chunks).
    ``kv_slots``           size of the token-slot KV pool; by default it is sized
                           from ``kv_cache_gib``.
    ``prepack_weights``    on CPU, hold projections in oneDNN's blocked layout.
    ``prefix_cache``       share KV of common prefixes through the radix cache.
    ``shared_prefix_min_tokens``  decodes sharing a cached prefix at least this long
                           get its attention computed once per group (cascade
                           attention); ``None`` turns it off. Decode steps that
                           replay a CUDA graph skip it (their plan is fixed).
    ``enforce_eager``      never capture CUDA graphs (vLLM's name).
    ``quantization``       weight-only quantized matmuls (CPU): ``"gguf"`` keeps a GGUF
                           model's own 4-bit blocks (Q4_0/Q4_1/Q4_K as int4; other
                           types are de-quantized), ``"int4"``/``"int8"`` quantize
                           every projection and the head at load,
                           ``None`` keeps them in ``dtype``. ``"auto"``: ``"gguf"``
                           for a GGUF model on the CPU unless ``dtype`` is float32
                           or float16 (the parity path), else ``None``.
    ``quantized_prefill_dense``  quantized matmuls keep a bfloat16 copy of their weights
                           for prefill rows, many times faster there than the int
                           kernels (decode rows always take the kernels); False saves
                           the memory and makes prefill slow.
    ``cuda_graph_max_batch``  on CUDA, decode-only steps of up to this many requests
                           replay a graph captured per batch-size bucket
                           (:mod:`engine.cuda_graph`); larger ones run eagerly.
    ``urgent_prefill_tokens``  while a request decodes that is more urgent (lower
                           ``priority``) than some prefill of the step, the step's
                           prefill tokens are capped at this, so the urgent decode's
                           step stays short (:mod:`engine.scheduler`); ``None``: no cap.
    ``load_format``        ``"auto"``: weights from the model's files; ``"dummy"``
                           (vLLM's): the model is only a config (a shape of
                           ``engine/model_configs/``, a config.json, a model directory)
                           filled with seeded random weights on the device
                           (:mod:`engine.loader`, :mod:`engine.models.dummy`).
    ``tokenizer``          a tokenizer apart from the model's (a directory, GGUF file or
                           hub id); ``None``: the model's, and for a dummy model the
                           embedded SmolLM2's.
    ``dummy_seed``         the seed of a dummy model's random weights.
    ``speculative_tokens`` prompt-lookup speculative decoding (:mod:`engine.speculative`):
                           a decoding request whose last ``ngram_max``..``ngram_min``
                           tokens occurred before gets up to this many of the tokens
                           that followed them as a draft, verified in its decode step;
                           ``0`` turns it off.
    ``speculative_max_batch``  drafts only while at most this many requests decode:
                           in a larger batch their extra rows cost more than they save.
    ``max_wait_steps``     a waiting request that has waited this many steps goes ahead
                           of those of its priority that have waited less, cached
                           prefix or not, so none waits unboundedly behind a stream of
                           cache hits (:mod:`engine.scheduler`); ``0``: first come,
                           first served within a priority; ``None``: no aging.
    """

    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    max_model_len: int | None = None
    max_running: int = 64
    max_batched_tokens: int = 2048
    kv_slots: int | None = None
    kv_cache_gib: float = 1.0
    prepack_weights: bool = True
    prefix_cache: bool = True
    shared_prefix_min_tokens: int | None = 256
    enforce_eager: bool = False
    cuda_graph_max_batch: int = 64
    quantization: str | None = "auto"
    quantized_prefill_dense: bool = True
    # Measured on the CPU (SmolLM2-135M, 2 cores): a decode step of one request takes
    # ~17 ms; with a prefill chunk of n new tokens beside it, 40 ms at n=8, 50 at 16, 71
    # at 32, 111 at 64, 165 at 128. Any prefill costs a fixed ~20 ms (its rows take
    # another matmul kernel), then ~1.3 ms a token. 32 keeps each urgent step near 70 ms
    # while amortising that fixed cost: each prefilled token delays the urgent request by
    # ~1.7 ms at 32, against 2.1 at 16 and 2.9 at 8 (and 1.5 at 64, for 111 ms steps).
    urgent_prefill_tokens: int | None = 32
    # Longest-cached-prefix-first pays while a fan-out's points arrive: all together when
    # the skeleton ends, or one per skeleton line (some 10 steps apart) when pipelined.
    # 64 steps keeps that order for a whole fan-out, while a cold request (often a new
    # question's skeleton, whose first token is what the user waits for) waits behind
    # cache hits for at most 64 steps: 1-10 s at the CPU step times measured above, about
    # 1 s at 15 ms a step. Steps, not seconds: the bound is the same on any machine, and
    # tests can check it.
    max_wait_steps: int | None = 64
    load_format: str = "auto"
    tokenizer: str | None = None
    dummy_seed: int = 0
    speculative_tokens: int = 3
    ngram_min: int = 2
    ngram_max: int = 3
    # Measured (evals.bench_engine --sections speculative, 20 vicuna80 answers, 2-core
    # CPU): drafts gave 1.27x the answer tokens/s decoding one request, 1.14x two at
    # once, 0.95x four at once (every draft row costs about a decode row there).
    speculative_max_batch: int = 2

    def __post_init__(self) -> None:
        least = {"max_running": 1, "max_batched_tokens": 1, "kv_slots": 1,
                 "max_model_len": 2, "shared_prefix_min_tokens": 1,
                 "cuda_graph_max_batch": 0, "urgent_prefill_tokens": 0,
                 "max_wait_steps": 0, "speculative_tokens": 0, "ngram_min": 1,
                 "speculative_max_batch": 0}  # fmt: skip
        for name, low in least.items():
            value = getattr(self, name)
            if value is not None and value < low:
                raise ValueError(f"{name} must be at least {low}, got {value}")
        if self.quantization == "none":
            self.quantization = None
        if self.quantization not in (None, "auto", *QUANTIZATION_MODES):
            raise ValueError(
                f"unknown quantization {self.quantization!r}; use auto, none, "
                + ", ".join(QUANTIZATION_MODES)
            )
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(
                f"unknown load_format {self.load_format!r}; available: {', '.join(LOAD_FORMATS)}"
            )
        if self.ngram_max < self.ngram_min:
            raise ValueError(
                f"ngram_max ({self.ngram_max}) must be at least ngram_min ({self.ngram_min})"
            )
        if self.kv_cache_gib <= 0:
            raise ValueError(f"kv_cache_gib must be positive, got {self.kv_cache_gib}")


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """Map ``"float32" | "bfloat16" | "float16" | "auto"`` to a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {
        None: torch.float32,
        "auto": torch.float32,
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
    }
    if dtype not in table:
        raise ValueError(f"unsupported dtype {dtype!r}; use float32, bfloat16 or float16")
    return table[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/``None`` picks CUDA when available, else CPU."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    return dev


def resolve_quantization(
    quantization: str | None, dtype: str | torch.dtype | None, device: torch.device, gguf: bool
) -> tuple[str | None, torch.dtype]:
    """The quantization mode and activation dtype an engine runs with.

    ``"auto"`` keeps a GGUF model's own quantization on the CPU unless ``dtype`` asks
    for float32 or float16 (the dense parity path). Quantized matrices always multiply
    in bfloat16; the activations between them (residual stream, norms, attention, KV
    cache) stay float32 unless ``dtype`` says bfloat16: measured on SmolLM2 Q4_1,
    float32 activations are both faster on the CPU (one fused op per norm, no casts
    inside attention) and closer to the float32 model (top-1 agreement 98.6% against
    96.9%, ``evals.quant_quality``). ``dtype`` ``"auto"`` is bfloat16 on CUDA, where
    quantized weights are not supported yet (asking for them there is an error).
    """
    auto_dtype = dtype in (None, "auto")
    if quantization == "auto":
        quantization = None
        if gguf and device.type == "cpu" and (auto_dtype or resolve_dtype(dtype) == torch.bfloat16):
            quantization = "gguf"
    if quantization is None:
        if auto_dtype:
            return None, torch.bfloat16 if device.type == "cuda" else torch.float32
        return None, resolve_dtype(dtype)
    if device.type != "cpu":
        raise ValueError(
            f"quantization {quantization!r} runs on the CPU only; use none on {device}"
        )
    if quantization == "gguf" and not gguf:
        raise ValueError("quantization 'gguf' needs a GGUF model; use int4 or int8")
    return quantization, torch.float32 if auto_dtype else resolve_dtype(dtype)
