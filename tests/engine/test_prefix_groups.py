"""Fan-out groups from the radix tree, and the shared-prefix attention path in the engine."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from engine.prefix_groups import find_prefix_groups

PREFIX = list(range(100, 180))  # 80 shared prompt tokens
TAILS = [[7, 8], [9], [11, 12, 13], [14, 15], [16]]


@pytest.fixture(scope="module")
def llms(tiny_llama_dir):
    def make(min_tokens):
        return LLM(
            str(tiny_llama_dir), dtype="float32", device="cpu", kv_slots=4096,
            shared_prefix_min_tokens=min_tokens,
        )  # fmt: skip

    return make(32), make(None)


def fan_out(llm: LLM, n_tokens: int = 12) -> list[list[int]]:
    params = SamplingParams(max_tokens=n_tokens, temperature=0, ignore_eos=True)
    # the first request caches the prefix; the fan-out then shares it in the radix tree
    llm.generate([[*PREFIX, 1]], SamplingParams(max_tokens=1, temperature=0))
    return [o.token_ids for o in llm.generate([PREFIX + t for t in TAILS], params)]


def test_shared_prefix_path_gives_the_same_tokens(llms, monkeypatch):
    grouped, plain = llms
    seen: list = []
    runner = grouped.engine.runner
    original = runner.backend.plan

    def spy(ctx):
        seen.append(list(ctx.prefix_groups))
        original(ctx)

    monkeypatch.setattr(runner.backend, "plan", spy)
    assert fan_out(grouped) == fan_out(plain)
    # the decode steps ran as one group sharing (at least) the 80-token prefix
    groups = [g for step in seen for g in step]
    assert groups, "no decode step found a fan-out group"
    assert all(len(g.members) == len(TAILS) and g.prefix_len >= len(PREFIX) for g in groups)


def test_groups_follow_the_locked_radix_paths(llms):
    grouped, _ = llms
    eng = grouped.engine
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    eng.add(eng.make_request([*PREFIX, 3], SamplingParams(max_tokens=1, temperature=0)))
    while eng.has_unfinished():
        eng.step()
    others = list(range(300, 340))  # a different 40-token prompt: not in the group
    reqs = [eng.make_request(p, params) for p in [[*PREFIX, 5], [*PREFIX, 6], others]]
    for r in reqs:
        eng.add(r)
    for _ in range(3):  # prefill, then decodes
        eng.step()
    decodes = [r for r in reqs if r.output_ids]
    [group] = find_prefix_groups(decodes, min_tokens=32)
    assert [decodes[i] for i in group.members] == reqs[:2]
    assert group.prefix_len >= len(PREFIX)
    # the shared slots really are the same for both members
    rows = [reqs[0].row, reqs[1].row]
    table = eng.table.table
    assert table[rows[0], : group.prefix_len].equal(table[rows[1], : group.prefix_len])
    assert find_prefix_groups(decodes, min_tokens=group.prefix_len + 1) == []
    for r in reqs:
        eng.abort(r.request_id)
