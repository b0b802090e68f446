"""Any OpenAI-compatible ``/v1/completions`` server: sotserve's own, SGLang or vLLM.

Prompts go out as token ids, so the server's radix cache sees exactly the ids the
planner built. ``return_token_ids`` (a vLLM extension that sotserve's server also
speaks) asks for the generated ids; servers that do not send them make the planner
re-tokenize the skeleton text instead.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from sotserve.backends.base import (
    Backend,
    BackendError,
    BackendRequestError,
    CompletionChunk,
    CompletionParams,
)


class HTTPBackend(Backend):
    """Streams ``/v1/completions`` with aiohttp.

    ``model`` is sent with each request and names the tokenizer too (a Hugging Face
    directory or hub id; None is the embedded SmolLM2) unless ``tokenizer`` is
    given, either as a tokenizer object or as a name for ``AutoTokenizer``.
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        tokenizer: Any = None,
        *,
        api_key: str | None = None,
        timeout: float = 600.0,
        max_model_len: int | None = None,
        send_priority: bool = False,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self._model = model
        self._max_model_len = max_model_len
        # vLLM refuses a non-zero priority unless it runs with --scheduling-policy
        # priority, so it is only sent when asked for (sotserve's engine takes it).
        self._send_priority = send_priority
        if tokenizer is None or isinstance(tokenizer, str):
            tokenizer = _load_tokenizer(tokenizer or model)
        self._tokenizer = tokenizer
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=10)
        self._session: aiohttp.ClientSession | None = None

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def model_name(self) -> str:
        return self._model or "default"

    @property
    def max_model_len(self) -> int | None:
        return self._max_model_len

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        return self._session

    async def complete(
        self, prompt: str | list[int], params: CompletionParams
    ) -> AsyncIterator[CompletionChunk]:
        body: dict[str, Any] = {
            "prompt": prompt,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stream": True,
            # continuous_usage_stats (vLLM's; others ignore it) puts usage on every
            # chunk, so a caller that stops reading early still learns its cached tokens
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "return_token_ids": True,
        }
        if self._model is not None:
            body["model"] = self._model
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        # vLLM's and OpenAI's extra sampling fields, only when used
        defaults = CompletionParams(max_tokens=1)
        for name in ("min_tokens", "repetition_penalty", "frequency_penalty", "presence_penalty"):
            if getattr(params, name) != getattr(defaults, name):
                body[name] = getattr(params, name)
        if params.logit_bias:
            body["logit_bias"] = {str(t): b for t, b in params.logit_bias.items()}  # as OpenAI
        if params.priority and self._send_priority:
            body["priority"] = params.priority
        url = f"{self.base_url}/completions"
        finished: CompletionChunk | None = None
        try:
            # Leaving this block early closes the connection, and the server aborts.
            async with self._client().post(url, json=body) as resp:
                if resp.status >= 400:
                    raise await _error_from(resp)
                async for event in _sse_events(resp):
                    usage = event.get("usage")
                    choices = event.get("choices") or []
                    if not choices:
                        if usage and finished is not None:
                            finished.prompt_tokens = usage.get("prompt_tokens")
                            details = usage.get("prompt_tokens_details") or {}
                            finished.cached_tokens = details.get("cached_tokens")
                        continue
                    choice = choices[0]
                    chunk = CompletionChunk(
                        choice.get("text") or "",
                        choice.get("token_ids"),
                        choice.get("finish_reason"),
                    )
                    if usage:
                        details = usage.get("prompt_tokens_details") or {}
                        chunk.cached_tokens = details.get("cached_tokens")
                    if chunk.finish_reason is None:
                        yield chunk
                    else:
                        finished = chunk  # held until the usage event that follows it
        except aiohttp.ClientError as exc:
            raise BackendError(f"{url}: {exc.__class__.__name__}: {exc}") from exc
        except TimeoutError as exc:
            raise BackendError(f"{url}: timed out") from exc
        if finished is None:
            raise BackendError(f"{url}: the stream ended without a finish_reason")
        yield finished

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


async def _sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """JSON payloads of ``data:`` lines until ``[DONE]``."""
    async for raw in resp.content:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            event = json.loads(data)
        except json.JSONDecodeError as exc:
            raise BackendError(f"malformed stream event: {data[:200]!r}") from exc
        if "error" in event:
            err = event["error"]
            raise BackendError(err.get("message", str(err)) if isinstance(err, dict) else str(err))
        yield event


async def _error_from(resp: aiohttp.ClientResponse) -> BackendError:
    text = await resp.text()
    message, param, code = text[:500], None, None
    try:
        err = json.loads(text).get("error")
        if isinstance(err, dict):
            message, param = err.get("message", message), err.get("param")
            code = err.get("code") if isinstance(err.get("code"), str) else None
        elif isinstance(err, str):
            message = err
    except (json.JSONDecodeError, AttributeError):
        pass
    message = f"HTTP {resp.status}: {message}"
    if 400 <= resp.status < 500:
        return BackendRequestError(message, param, code)
    return BackendError(message)


def _load_tokenizer(name: str | None) -> Any:
    """The tokenizer of a local directory, hub id or GGUF; None is the embedded model."""
    from engine.loader import resolve_model

    return resolve_model(name).tokenizer()
