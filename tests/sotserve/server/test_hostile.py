"""A battery of hostile requests against ``sotserve serve`` (real HTTP, embedded
SmolLM2): none may get a 5xx, hang, or take the engine down. One of them
(``top_k: 2**70``) once overflowed the sampler and killed the step loop, which ended
the server for everyone.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

pytestmark = pytest.mark.slow

Q = [{"role": "user", "content": "Name two colors."}]
JSON = {"Content-Type": "application/json"}


def chat(**kw: Any) -> tuple[str, str, bytes, dict[str, str]]:
    body = {"messages": Q, "max_tokens": 4, "sot": {"mode": "sequential"}, **kw}
    return "POST", "/v1/chat/completions", json.dumps(body).encode(), JSON


def comp(**kw: Any) -> tuple[str, str, bytes, dict[str, str]]:
    return (
        "POST",
        "/v1/completions",
        json.dumps({"prompt": "Hi", "max_tokens": 2, **kw}).encode(),
        JSON,
    )


def raw(path: str, data: bytes | None, headers: dict[str, str] = JSON, method: str = "POST"):
    return method, path, data, headers


def messages(content: Any) -> bytes:
    return json.dumps(
        {"messages": [{"role": "user", "content": content}], "max_tokens": 4}
    ).encode()


CASES = {
    "chat max_tokens float": chat(max_tokens=8.0),
    "chat max_tokens 1e30": chat(max_tokens=10**30),
    "chat seed 2**70": chat(seed=2**70),
    "chat negative seed": chat(seed=-5),
    "chat temperature 1e308": chat(temperature=1e308),
    "chat logit_bias out of vocabulary": chat(logit_bias={"99999999": 5}),
    "chat logit_bias 2000 entries": chat(logit_bias={str(i): 1 for i in range(2000)}),
    "chat logit_bias negative key": chat(logit_bias={"-1": 5}),
    "chat n 0": chat(n=0),
    "chat model a number": chat(model=5),
    "chat image part": raw(
        "/v1/chat/completions", messages([{"type": "image_url", "image_url": {}}])
    ),
    "chat no parts": raw("/v1/chat/completions", messages([])),
    "chat null byte": raw("/v1/chat/completions", messages("hi\u0000there")),
    "chat sot at its limits": chat(
        sot={"mode": "graph", "max_points": 16, "point_max_tokens": 4096}
    ),
    "chat min_tokens 1e9": chat(min_tokens=10**9, max_tokens=None),
    "chat include_usage a string": chat(stream=True, stream_options={"include_usage": "yes"}),
    "chat 1000 messages": raw("/v1/chat/completions", json.dumps({"messages": Q * 1000}).encode()),
    "chat tool role": raw(
        "/v1/chat/completions",
        json.dumps({"messages": [{"role": "tool", "content": "x"}]}).encode(),
    ),
    "chat 1M characters": raw("/v1/chat/completions", messages("a" * 1_000_000)),
    "chat 5 MB of words": raw("/v1/chat/completions", messages("hello " * 800_000)),
    "chat router bait": chat(
        messages=[{"role": "user", "content": "how does " * 20000}], sot={"mode": "auto"}
    ),
    "body null": raw("/v1/chat/completions", b"null"),
    "body empty": raw("/v1/chat/completions", b""),
    "body 5000-digit int": raw(
        "/v1/chat/completions", b'{"messages": [], "max_tokens": ' + b"9" * 5000 + b"}"
    ),
    "body latin-1": raw("/v1/chat/completions", '{"messages": "caf\xe9"}'.encode("latin-1")),
    "completion no ids": comp(prompt=[]),
    "completion [[]]": comp(prompt=[[]]),
    "completion negative id": comp(prompt=[-1]),
    "completion id 2**70": comp(prompt=[2**70]),
    "completion two prompts": comp(prompt=["a", "b"]),
    "completion bool ids": comp(prompt=[True]),
    "completion float ids": comp(prompt=[1.0]),
    "completion empty prompt": comp(prompt=""),
    "completion max_tokens 1e12": comp(max_tokens=10**12),
    "completion 100 stops": comp(stop=["x"] * 100),
    "completion empty stop": comp(stop=[""]),
    "completion stop id 2**70": comp(stop_token_ids=[2**70]),
    "completion top_k 2**70": comp(top_k=2**70, temperature=1.0),
    "completion priority 2**70": comp(priority=2**70),
    "completion 200k ids": comp(prompt=list(range(200_000))),
    "completion 30-digit bias key": comp(logit_bias={"9" * 30: 1}),
    "completion seed 2**64": comp(seed=2**64),
    "PUT": raw("/v1/chat/completions", b"{}", method="PUT"),
    "traversal": raw("/static/../../../etc/passwd", None, {}, method="GET"),
    "encoded traversal": raw("/static/%2e%2e/%2e%2e/etc/passwd", None, {}, method="GET"),
    "admin route without its key": raw("/reset_prefix_cache", None, {}),
    "text/plain": raw(
        "/v1/chat/completions", json.dumps({"messages": Q}).encode(), {"Content-Type": "text/plain"}
    ),
    "foreign Host": raw("/v1/models", None, {"Host": "evil.example"}, method="GET"),
}


async def test_no_hostile_request_gets_a_5xx_or_takes_the_engine_down(http):
    statuses: dict[str, int] = {}
    for name, (method, path, data, headers) in CASES.items():
        async with http.request(method, path, data=data, headers=headers) as resp:
            statuses[name] = resp.status
            text = await resp.text()
        assert resp.status < 500, (name, text[:300])
        if resp.status >= 400 and resp.content_type == "application/json":
            assert json.loads(text)["error"]["message"], name
    async with http.get("/health") as resp:
        assert resp.status == 200  # the engine lived through all of it
    # legitimate, if odd: everything else is refused with a 4xx
    served = {n for n, s in statuses.items() if s < 400}
    assert served == ANSWERED, statuses


ANSWERED = {
    "chat negative seed",
    "chat null byte",
    "chat sot at its limits",
    "completion stop id 2**70",
    "completion top_k 2**70",  # means "no top-k"
}
