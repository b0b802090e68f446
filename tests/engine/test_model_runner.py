"""``ModelRunner.prepare``: the flat batch and forward context of a mixed step."""

from __future__ import annotations

from engine import SamplingParams
from engine.llm_engine import LLMEngine


def test_prepare_flattens_decodes_then_prefill_chunks(tiny_llama_dir):
    eng = LLMEngine(str(tiny_llama_dir), dtype="float32", device="cpu", max_batched_tokens=8)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    first = eng.get_request(eng.add_request([101, 102, 103], params))
    eng.step()  # prefills ``first``: it decodes from now on
    second = eng.get_request(eng.add_request(list(range(200, 212)), params))

    batch = eng.scheduler.schedule()
    assert batch.decodes == [first]
    assert batch.prefills == [(second, 7)]  # the budget left after the decode
    input_ids, ctx, sample_at, sampled = eng.runner.prepare(batch)

    assert input_ids.tolist() == [first.output_ids[-1], *range(200, 207)]
    assert ctx.positions.tolist() == [3, *range(7)]
    assert (ctx.rows, ctx.q_lens, ctx.kv_lens) == ([first.row, second.row], [1, 7], [4, 7])
    assert ctx.num_decodes == 1
    table = eng.table.table
    assert ctx.out_slots.tolist() == [table[first.row, 3].item(), *table[second.row, :7].tolist()]
    assert ctx.attn is not None  # the backend planned the step
    # the chunk stops short of the prompt's end, so only the decode is sampled
    assert sample_at.tolist() == [0] and sampled == [first]

    reqs, tokens = eng.runner.run(batch)  # the same batch through the whole path
    assert reqs == [first] and len(tokens) == 1
    assert isinstance(tokens[0], int)
    eng.scheduler.postprocess(batch, reqs, tokens)
    assert first.num_computed == 4 and second.num_computed == 7
    # the decode's row takes the quantized kernels, the prompt chunk's the dense copy
    assert ctx.num_decodes == 1


def test_a_jump_forward_chunk_goes_in_as_decode_rows(tiny_llama_dir):
    """Forced tokens are computed with the token after them as a chunk of generated
    tokens; each of its tokens is a one-query row after the decodes', with the keys up
    to it (``ForwardContext.num_decodes`` counts them), so they take the decode
    attention and the quantized kernels, and a prompt chunk after them does not."""
    eng = LLMEngine(str(tiny_llama_dir), dtype="float32", device="cpu")
    plain = SamplingParams(max_tokens=8, ignore_eos=True, temperature=0)
    decoding = eng.get_request(eng.add_request([101, 102, 103], plain))
    eng.step()
    jumping = eng.get_request(eng.add_request([104, 105, 106], plain))
    eng.step()
    # two tokens forced after the one it sampled, as postprocess appends a rule's tokens
    # (the runner sees only the pending generated tokens, whatever rule made them)
    token = jumping.output_ids[-1]
    jumping.output_ids.extend([7, 8])
    prompt = eng.get_request(eng.add_request(list(range(300, 310)), plain))

    batch = eng.scheduler.schedule()
    assert batch.decodes == [decoding]
    assert {r.request_id: n for r, n in batch.prefills} == {
        jumping.request_id: 3,
        prompt.request_id: 10,
    }
    input_ids, ctx, sample_at, sampled = eng.runner.prepare(batch)
    # the decode, then the jumping request's three generated tokens, then the prompt
    assert input_ids.tolist()[:4] == [decoding.output_ids[-1], token, 7, 8]
    assert ctx.q_lens == [1, 1, 1, 1, 10]
    assert ctx.rows == [decoding.row, jumping.row, jumping.row, jumping.row, prompt.row]
    assert ctx.kv_lens[1:4] == [4, 5, 6]  # each token sees the keys up to its own
    assert ctx.num_decodes == 4
    assert sampled == [decoding, jumping, prompt]
    assert sample_at.tolist() == [0, 3, 13]
