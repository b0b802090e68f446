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

from engine.attention import create_backend
from engine.cache_manager import CacheManager
from engine.config import EngineConfig, resolve_device, resolve_quantization
from engine.detokenizer import IncrementalDetokenizer
from engine.errors import ContextLengthExceededError, InvalidRequestError
from engine.kv_cache import KVPool, ReqToTokenTable, SlotAllocator
from engine.loader import resolve_model
from engine.model_runner import ModelRunner
from engine.models import ModelArgs, build_model
from engine.models.llama import rope_inv_freq
from engine.outputs import RequestDelta, RequestOutput
from engine.radix_cache import RadixCache
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from kernels.rope import rope_cos_sin_cache

logger = logging.getLogger(__name__)

Prompt = str | list[int]


class LLMEngine:
    """Loads a model and runs continuous batching over a token-slot KV pool.

    ``config`` keys are the fields of :class:`EngineConfig` (``max_model_len``,
    ``max_running``, ``max_batched_tokens``, ``kv_slots``, ``kv_cache_gib``,
    ``prepack_weights``, ``prefix_cache``, ``shared_prefix_min_tokens``,
    ``enforce_eager``, ``cuda_graph_max_batch``) plus
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
        files = resolve_model(model)
        self.config = cfg = EngineConfig(device=dev, **config)
        cfg.quantization, cfg.dtype = resolve_quantization(
            cfg.quantization, dtype, dev, files.gguf is not None
        )
        self.model_name = model or files.name
        hf_config = files.config()
        self.tokenizer = files.tokenizer()
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
        self.cache = RadixCache(self.slots) if cfg.prefix_cache else None
        self.cm = CacheManager(self.slots, self.table, self.cache)
        self.scheduler = Scheduler(cfg, self.cm)
        self.backend = create_backend(attention_backend, dev)
        self.model = build_model(
            files, hf_config, self.backend, cfg.dtype, dev, prepack=cfg.prepack_weights,
            quantization=cfg.quantization, dense_max_rows=cfg.quantized_dense_max_rows,
        )  # fmt: skip
        inv_freq, scaling = rope_inv_freq(hf_config, args.head_dim)
        cos, sin = rope_cos_sin_cache(inv_freq, cfg.max_model_len, scaling)
        self.runner = ModelRunner(
            self.model, self.backend, self.kv_pool, self.table, cos.to(dev), sin.to(dev), dev,
            shared_prefix_min_tokens=cfg.shared_prefix_min_tokens if self.cache else None,
        )  # fmt: skip
        if (
            dev.type == "cuda"
            and not cfg.enforce_eager
            and cfg.cuda_graph_max_batch > 0
            and self.backend.supports_graphs
        ):
            self.runner.capture_decode_graphs(min(cfg.cuda_graph_max_batch, cfg.max_running))

        self._requests: dict[str, Request] = {}
        self._arrivals = itertools.count()
        self._stats = dict.fromkeys(
            ("prompt_tokens", "computed_prefill_tokens", "decode_tokens",
             "generated_tokens", "steps", "batched_requests", "max_batch_size",
             "finished_requests", "aborted_requests"), 0)  # fmt: skip

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
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None
    ) -> Request:
        """Validate and tokenize; raises :class:`InvalidRequestError` subclasses."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params must be a SamplingParams", "params")
        params.validate()
        ids = self.tokenize(prompt)
        if not ids:
            raise InvalidRequestError("prompt is empty", "prompt")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})", "prompt"
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
        )

    def add(self, req: Request) -> None:
        if req.request_id in self._requests:
            raise InvalidRequestError(
                f"request id {req.request_id!r} is already running", "request_id"
            )
        self._requests[req.request_id] = req
        self._stats["prompt_tokens"] += len(req.prompt_ids)
        self.scheduler.add(req)

    def add_request(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        req = self.make_request(prompt, params, request_id)
        self.add(req)
        return req.request_id

    def abort(self, request_id: str) -> RequestDelta | None:
        """Drop a request and free its slots now; returns its final delta, if it was live."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return None
        self.scheduler.release(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = "abort"
        self._stats["aborted_requests"] += 1
        return RequestDelta(
            request_id,
            req.pop_new_tokens(),
            req.detok.pop_delta(True),
            "abort",
            req.cached_prompt_tokens or 0,
        )

    def reset_prefix_cache(self) -> int:
        """Evict every cached prefix that no running request holds (vLLM's
        ``reset_prefix_cache``, SGLang's ``flush_cache``); returns the tokens freed.

        Benchmarks call it so one run cannot warm the cache for the next.
        """
        if self.cache is None:
            return 0
        freed = self.cache.evict(self.cache.evictable_size)
        self.cm.evicted_tokens += freed
        return freed

    def cached_prefix_len(self, prompt: Prompt) -> int:
        """How many leading tokens of ``prompt`` the prefix cache holds now."""
        if self.cache is None:
            return 0
        return int(self.cache.match_prefix(self.tokenize(prompt))[0].numel())

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def get_request(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    # -- the step ------------------------------------------------------------------
    def step(self) -> list[RequestDelta]:
        """Run one batched forward; return a delta for every request that advanced."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        reqs, tokens = self.runner.run(batch)
        st = self._stats
        st["steps"] += 1
        n_reqs = len(batch.decodes) + len(batch.prefills)
        st["batched_requests"] += n_reqs
        st["max_batch_size"] = max(st["max_batch_size"], n_reqs)
        for req in batch.decodes:
            # a chunk may leave exactly the last prompt token pending: that is prefill
            st[
                "computed_prefill_tokens"
                if req.num_computed < len(req.prompt_ids)
                else "decode_tokens"
            ] += 1
            req.num_computed += 1
        for req, n in batch.prefills:
            req.num_computed += n
            st["computed_prefill_tokens"] += n
            # cache each chunk at once, so siblings waiting on this prefix can use it
            self.cm.commit(req)
        deltas = []
        for req, token in zip(reqs, tokens, strict=True):
            st["generated_tokens"] += 1
            req.output_ids.append(token)
            req.detok.add(token)
            reason = self._finish_reason(req, token)
            if reason is not None:
                self._finish(req, reason)
            deltas.append(
                RequestDelta(
                    req.request_id,
                    req.pop_new_tokens(),
                    req.detok.pop_delta(reason is not None),
                    reason,
                    (req.cached_prompt_tokens or 0) if reason is not None else None,
                )
            )
        return deltas

    def _finish_reason(self, req: Request, token: int) -> str | None:
        if token in req.stop_ids or req.detok.stopped:
            return "stop"
        if (
            len(req.output_ids) >= req.params.max_tokens
            or req.num_tokens >= self.config.max_model_len
        ):
            return "length"
        return None

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        req.status = RequestStatus.FINISHED
        self.scheduler.release(req)
        self._requests.pop(req.request_id, None)
        self._stats["finished_requests"] += 1

    def output_of(self, req: Request) -> RequestOutput:
        return RequestOutput(
            req.request_id, req.prompt_ids, list(req.output_ids), req.detok.text, req.finish_reason
        )

    # -- introspection -----------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        st = dict(self._stats)
        st["running"] = len(self.scheduler.running)
        st["waiting"] = len(self.scheduler.waiting)
        cache = self.cache
        evictable = cache.evictable_size if cache else 0
        # in use = held by running requests, including the cached prefixes they lock
        st["kv_slots_used"] = self.slots.num_used - evictable
        st["kv_slots_total"] = self.slots.num_slots
        st["cache_size"] = cache.total_size if cache else 0
        st["cached_tokens"] = self.scheduler.cached_tokens
        st["evicted_tokens"] = self.cm.evicted_tokens
        st["preemptions"] = self.scheduler.num_preemptions
        st["mean_batch_size"] = st["batched_requests"] / st["steps"] if st["steps"] else 0.0
        st["graph_steps"] = self.runner.graph_steps
        return st


def _eos_ids(tokenizer: Any, gen_config: Any, hf_config: Any) -> frozenset[int]:
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
