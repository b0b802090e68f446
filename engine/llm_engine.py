"""The synchronous engine core: requests in, one batched step at a time, deltas out.

Not thread-safe: :class:`engine.LLM` drives it in the caller's thread and
:class:`engine.AsyncEngine` from its own step thread.
"""

from __future__ import annotations

import itertools
import logging
import uuid
from typing import Any

import torch
from transformers import GenerationConfig, PretrainedConfig
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from engine.attention import create_backend
from engine.cache_manager import CacheManager
from engine.config import EngineConfig, resolve_device, resolve_quantization
from engine.detokenizer import IncrementalDetokenizer
from engine.errors import ContextLengthExceededError, InvalidRequestError
from engine.kv_cache import KVPool, ReqToTokenTable, SlotAllocator
from engine.loader import resolve
from engine.model_runner import ModelRunner
from engine.models import ModelArgs, build_model
from engine.models.llama import rope_inv_freq
from engine.models.ops import create_ops
from engine.outputs import RequestDelta, RequestOutput
from engine.prefix_cache import NoPrefixCache, PrefixCache
from engine.radix_cache import RadixCache
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.stats import EngineStats
from sot_kernels.rope import rope_cos_sin_cache

logger = logging.getLogger(__name__)

Prompt = str | list[int]


class LLMEngine:
    """Loads a model and runs continuous batching over a token-slot KV pool.

    ``config`` keys are the fields of :class:`EngineConfig` (``max_model_len``,
    ``max_running``, ``max_batched_tokens``, ``kv_slots``, ``kv_cache_gib``,
    ``prepack_weights``, ``prefix_cache``, ``shared_prefix_min_tokens``,
    ``enforce_eager``, ``cuda_graph_max_batch``, ``urgent_prefill_tokens``) plus
    ``attention_backend`` (``"torch"`` or ``"triton"``; by default triton on CUDA,
    torch on the CPU).
    """

    def __init__(
        self,
        model: str | None = None,
        dtype: str | torch.dtype | None = "auto",
        device: str | torch.device | None = "auto",
        attention_backend: str | None = None,
        **config: Any,
    ) -> None:
        unknown = set(config) - set(EngineConfig.__dataclass_fields__) - {"dtype", "device"}
        if unknown:
            raise TypeError(f"unknown engine options: {sorted(unknown)}")
        dev = resolve_device(device)
        self.config = cfg = EngineConfig(device=dev, **config)
        files = resolve(model, cfg.load_format, cfg.tokenizer)
        cfg.quantization, cfg.dtype = resolve_quantization(
            cfg.quantization, dtype, dev, files.gguf is not None
        )
        self.model_name = model or files.name
        hf_config = files.config()
        self.tokenizer: PreTrainedTokenizerBase = files.tokenizer()
        args = ModelArgs.from_hf(hf_config)
        self.vocab_size = args.vocab_size
        self.eos_token_ids = _eos_ids(self.tokenizer, files.generation_config(), hf_config)

        max_len = cfg.max_model_len or args.max_position_embeddings
        if args.sliding_window:
            # Attention here is full attention; within the window the two agree.
            max_len = min(max_len, args.sliding_window)
        per_slot = KVPool.bytes_per_slot(
            args.num_layers, args.num_kv_heads, args.head_dim, cfg.dtype
        )
        if cfg.kv_slots is None:
            cfg.kv_slots = max(int(cfg.kv_cache_gib * 2**30 // per_slot), 1)
        cfg.max_model_len = min(max_len, cfg.kv_slots)

        self.kv_pool = KVPool(
            args.num_layers, cfg.kv_slots, args.num_kv_heads, args.head_dim, cfg.dtype, dev
        )
        self.slots = SlotAllocator(cfg.kv_slots, dev)
        self.table = ReqToTokenTable(cfg.max_running, cfg.max_model_len, dev)
        # Without prefix caching the cache is one that keeps nothing, so no code path
        # below has to ask whether there is a cache.
        self.cache: PrefixCache = RadixCache(self.slots) if cfg.prefix_cache else NoPrefixCache(dev)
        self.cm = CacheManager(self.slots, self.table, self.cache)
        self.scheduler = Scheduler(cfg, self.cm)
        self.backend = create_backend(attention_backend, dev)
        self.model = build_model(
            files, hf_config, self.backend, cfg.dtype, dev, prepack=cfg.prepack_weights,
            quantization=cfg.quantization, prefill_dense=cfg.quantized_prefill_dense,
            ops=create_ops(attention_backend, dev), dummy_seed=cfg.dummy_seed,
        )  # fmt: skip
        inv_freq, scaling = rope_inv_freq(hf_config, args.head_dim)
        cos, sin = rope_cos_sin_cache(inv_freq, cfg.max_model_len, scaling)
        self.runner = ModelRunner(
            self.model, self.backend, self.kv_pool, self.table, cos.to(dev), sin.to(dev), dev,
            # NoPrefixCache's requests all end at its root, so they never form a group
            shared_prefix_min_tokens=cfg.shared_prefix_min_tokens,
        )  # fmt: skip
        if (
            dev.type == "cuda"
            and not cfg.enforce_eager
            and cfg.cuda_graph_max_batch > 0
            and self.backend.supports_graphs
        ):
            self.runner.capture_decode_graphs(min(cfg.cuda_graph_max_batch, cfg.max_running))

        self._arrivals = itertools.count()

    # -- requests ----------------------------------------------------------------
    def tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=False)
        if isinstance(prompt, list | tuple) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            return list(prompt)
        raise InvalidRequestError("prompt must be a string or a list of token ids", "prompt")

    def make_request(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        return_hidden: bool = False,
    ) -> Request:
        """Validate and tokenize; raises :class:`InvalidRequestError` subclasses.

        ``priority`` is vLLM's: lower is scheduled first, and it may be negative
        (:mod:`engine.scheduler`). ``return_hidden`` asks for the final hidden state
        at the prompt's last token on the first delta (``RequestDelta.hidden``): a
        pooled embedding of the prompt, at the cost of its prefill."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params must be a SamplingParams", "params")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise InvalidRequestError("priority must be an integer", "priority")
        params.validate()
        ids = self.tokenize(prompt)
        if not ids:
            raise InvalidRequestError("prompt is empty", "prompt")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})", "prompt"
            )
        bad = [t for t in params.logit_bias if t >= self.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"logit_bias token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})",
                "logit_bias",
            )
        bad = [t for t in params.jump_forward_ids() if t >= self.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"jump_forward token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})",
                "jump_forward",
            )
        limit = self.config.max_model_len
        if len(ids) >= limit:
            raise ContextLengthExceededError(
                f"prompt has {len(ids)} tokens; this model's context length is {limit} "
                f"and at least one token must be generated",
                "prompt",
            )
        if len(ids) + params.max_tokens > limit:
            raise ContextLengthExceededError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"context length {limit}; lower max_tokens to at most {limit - len(ids)}",
                "max_tokens",
            )
        generator = None
        if params.seed is not None and not params.greedy:
            generator = torch.Generator(device=self.config.device).manual_seed(params.seed)
        stop_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else self.eos_token_ids
        )
        return Request(
            request_id=request_id or uuid.uuid4().hex,
            prompt_ids=ids,
            params=params,
            arrival=next(self._arrivals),
            detok=IncrementalDetokenizer(self.tokenizer, ids, params.stop),
            stop_ids=stop_ids,
            generator=generator,
            priority=priority,
            return_hidden=return_hidden,
        )

    def add(self, req: Request) -> None:
        if req.request_id in self.scheduler.requests:
            raise InvalidRequestError(
                f"request id {req.request_id!r} is already running", "request_id"
            )
        self.scheduler.add(req)

    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
    ) -> str:
        req = self.make_request(prompt, params, request_id, priority)
        self.add(req)
        return req.request_id

    def abort(self, request_id: str) -> RequestDelta | None:
        """Drop a request and free its slots now; returns its final delta, if it was live."""
        return self.scheduler.abort(request_id)

    def reset_prefix_cache(self) -> int:
        """Evict every cached prefix that no running request holds (vLLM's
        ``reset_prefix_cache``, SGLang's ``flush_cache``); returns the tokens freed.

        Benchmarks call it so one run cannot warm the cache for the next.
        """
        freed = self.cache.evict(self.cache.evictable_size)
        self.cm.evicted_tokens += freed
        return freed

    def cached_prefix_len(self, prompt: Prompt) -> int:
        """How many leading tokens of ``prompt`` the prefix cache holds now."""
        return int(self.cache.match_prefix(self.tokenize(prompt))[0].numel())

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.requests)

    def get_request(self, request_id: str) -> Request | None:
        return self.scheduler.requests.get(request_id)

    # -- the step ------------------------------------------------------------------
    def step(self) -> list[RequestDelta]:
        """Run one batched forward; return a delta for every request that advanced."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        reqs, tokens = self.runner.run(batch)
        return self.scheduler.postprocess(batch, reqs, tokens)

    def output_of(self, req: Request) -> RequestOutput:
        return RequestOutput(
            req.request_id, req.prompt_ids, list(req.output_ids), req.detok.text, req.finish_reason
        )

    # -- introspection -----------------------------------------------------------------
    def stats(self) -> EngineStats:
        """Counters since start and the current gauges, as one snapshot."""
        c = self.scheduler.counters
        return EngineStats(
            prompt_tokens=c.prompt_tokens,
            computed_prefill_tokens=c.computed_prefill_tokens,
            decode_tokens=c.decode_tokens,
            generated_tokens=c.generated_tokens,
            steps=c.steps,
            batched_requests=c.batched_requests,
            max_batch_size=c.max_batch_size,
            finished_requests=c.finished_requests,
            aborted_requests=c.aborted_requests,
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            # in use = held by running requests, including the cached prefixes they lock
            kv_slots_used=self.slots.num_used - self.cache.evictable_size,
            kv_slots_total=self.slots.num_slots,
            cache_size=self.cache.total_size,
            cached_tokens=c.cached_tokens,
            evicted_tokens=self.cm.evicted_tokens,
            preemptions=c.preemptions,
            mean_batch_size=c.batched_requests / c.steps if c.steps else 0.0,
            graph_steps=self.runner.graph_steps,
            draft_tokens=c.draft_tokens,
            accepted_draft_tokens=c.accepted_draft_tokens,
        )


def _eos_ids(
    tokenizer: PreTrainedTokenizerBase,
    gen_config: GenerationConfig | None,
    hf_config: PretrainedConfig,
) -> frozenset[int]:
    """Token ids that end a generation: the generation config's and the model config's
    ``eos_token_id`` (an int or a list) and the tokenizer's."""
    ids: set[int] = set()
    for source in (gen_config, hf_config):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list | tuple):
            ids.update(int(e) for e in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)
