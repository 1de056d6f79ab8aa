"""litmodel.batching: continuous batching gives every request exactly the tokens it gets alone
(`litmodel.generate.generate`, batch 1), for both model families, greedy and seeded sampling, with
requests joining and leaving mid-way; stop tokens / strings, cancellation, and the text stream."""

from __future__ import annotations

import pytest
import torch

from litmodel import Config, build_model
from litmodel.batching import BatchEngine, QueueFull, generate_many
from litmodel.generate import generate
from litmodel.generation_request import Request, SamplingParams, TextStream
from litmodel.utils import LitModelError


pytestmark = pytest.mark.usefixtures("one_thread")


FAMILIES = {
    "llama-gqa": dict(model_type="llama", n_query_groups=2),
    "gpt2": dict(model_type="gpt2", bias=True, learned_pos_emb=True, rotary_percentage=0.0, tie_embeddings=True,
                 gelu_approximate="tanh"),
    "gpt_neox": dict(model_type="gpt_neox", bias=True, parallel_residual=True, rotary_percentage=0.25, n_head=2),
}


def tiny(family: str):
    torch.manual_seed(0)
    cfg = Config(**{**dict(name="tiny", block_size=64, vocab_size=80, n_layer=2, n_head=4, n_embd=32,
                           intermediate_size=64), **FAMILIES[family]})
    model = build_model(cfg).eval()
    with torch.no_grad():  # large weights: varied greedy continuations
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    return model


def lone(model, prompt, p: SamplingParams, S: int) -> list[int]:
    return list(generate(model, prompt, p.max_tokens, p.temperature, p.top_k, p.top_p, p.stop_ids, seed=p.seed,
                         max_seq_length=S))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_request_gets_its_lone_tokens(family):
    model = tiny(family)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 80, (n,), generator=g).tolist() for n in (7, 3, 11, 1, 5, 9, 2, 13, 6)]
    params = [SamplingParams(max_tokens=4 + 3 * i, temperature=0.0 if i % 3 else 0.9, top_k=None if i % 2 else 20,
                             top_p=0.95 if i == 3 else 1.0, seed=100 + i) for i in range(len(prompts))]
    ref = lone(model, prompts[4], params[4], 64)
    k = next(k for k in range(2, len(ref)) if ref[k] not in ref[:k])
    params[4].stop_ids = {ref[k]}  # ends early at a stop token
    # 4 slots for 9 requests: requests join as others finish
    reqs = generate_many(model, prompts, params, max_batch_size=4, max_seq_length=64)
    for prompt, p, r in zip(prompts, params, reqs):
        expected = lone(model, prompt, p, 64)
        assert r.output_ids == expected
        assert r.finish_reason == ("stop" if len(expected) < p.max_tokens else "length")
    assert len(reqs[4].output_ids) == k and reqs[4].completion_tokens == k + 1


def test_requests_joining_mid_decode_and_one_prefill_per_step():
    model = tiny("llama-gqa")
    engine = BatchEngine(model, max_batch_size=8, max_seq_length=48)
    greedy = SamplingParams(max_tokens=20, temperature=0)
    first = [engine.submit(Request([5, 6, 7], greedy)), engine.submit(Request([9] * 6, greedy))]
    engine.step()
    assert engine.num_active == 1 and len(engine.waiting) == 1  # one prefill per step, the others keep decoding
    for _ in range(4):
        engine.step()
    late = [engine.submit(Request(p, SamplingParams(max_tokens=n, temperature=0)))
            for p, n in (([1, 2], 9), ([30, 31, 32, 33, 34], 15), ([40], 3))]
    active = [engine.num_active]
    while engine.has_work():
        engine.step()
        active.append(engine.num_active)
    assert max(active) == 5 and all(b - a <= 1 for a, b in zip(active, active[1:]))  # one admission per step
    for r in first + late:
        assert r.output_ids == lone(model, r.prompt_ids, r.params, 48)
        assert r.done.is_set() and r.finish_reason == "length"
    engine.close()
    assert model.cache_len is None  # generate() gets a plain cache again
    assert lone(model, [5, 6, 7], greedy, 48) == first[0].output_ids


def test_cancel_frees_the_slot_and_queue_limit():
    model = tiny("gpt_neox")
    engine = BatchEngine(model, max_batch_size=2, max_seq_length=40, max_queue=1)
    p = SamplingParams(max_tokens=30, temperature=0)
    a, b, c = (engine.submit(Request([i + 3, 4, 5], p)) for i in range(3))
    with pytest.raises(QueueFull, match="retry later"):
        engine.submit(Request([1], p))
    for _ in range(3):
        engine.step()
    a.cancel()
    engine.step()  # a's slot goes to c
    assert a.finish_reason == "cancelled" and a.done.is_set() and len(a.output_ids) < 30
    assert engine.slots.count(None) == 0 and c in engine.slots
    engine.run()
    assert b.output_ids == lone(model, b.prompt_ids, p, 40) and c.output_ids == lone(model, c.prompt_ids, p, 40)
    assert engine.stats["cancelled"] == 1 and engine.stats["finished"] == 2
    with pytest.raises(LitModelError, match="exceed the context of 40"):
        engine.submit(Request([1] * 11, p))
    with pytest.raises(LitModelError, match="max_tokens must be >= 1"):
        engine.submit(Request([1], SamplingParams(max_tokens=0)))


class _ByteTok:
    """Token i is byte i (UTF-8): a multi-byte character spans several tokens."""

    def decode(self, ids, skip_special_tokens=False):
        return bytes(ids).decode("utf-8", errors="replace")

    def incremental_decoder(self, skip_special_tokens=False, context_ids=()):
        from litmodel.tokenizer import IncrementalDecoder

        self._hold_ids = set()
        return IncrementalDecoder(self, context_ids=context_ids)


def _stream(text: str, stop=()):
    s = TextStream(_ByteTok(), [], stop)
    parts, hit = [], False
    for b in text.encode():
        out, hit = s.add(b)
        parts.append(out)
        if hit:
            break
    if not hit:
        parts.append(s.finish())
    return parts, hit


def test_text_stream_never_breaks_characters_and_cuts_at_stop_strings():
    text = "naïve 日本語 text, then STOP here"
    parts, hit = _stream(text)
    assert "".join(parts) == text and not hit and all("\ufffd" not in p for p in parts)
    parts, hit = _stream(text, stop=["STOP", "zzz"])
    assert hit and "".join(parts) == "naïve 日本語 text, then "
    assert all("S" not in p for p in parts)  # the stop string's start was held back, never sent
    parts, hit = _stream(text, stop=["日本"])
    assert hit and "".join(parts) == "naïve "
    parts, hit = _stream("ab ab abc", stop=["abc"])
    assert hit and "".join(parts) == "ab ab "


def test_int8_and_bf16_models_batch_like_alone():
    """The serving options --quantize int8 and --precision bf16-true keep lone == batched."""
    from litmodel.quantize import optimize_for_decode, quantize_int8

    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 12], [13], [20, 21, 22]]
    params = [SamplingParams(max_tokens=6 + 2 * i, temperature=0) for i in range(len(prompts))]
    bf16 = optimize_for_decode(tiny("gpt2").to(torch.bfloat16), compiled=False)
    for model in (quantize_int8(tiny("llama-gqa")), bf16):
        reqs = generate_many(model, prompts, params, max_batch_size=3, max_seq_length=32)
        assert [r.output_ids for r in reqs] == [lone(model, p, q, 32) for p, q in zip(prompts, params)]


def test_a_failing_prefill_fails_only_its_request(capsys):
    model = tiny("llama-gqa")
    engine = BatchEngine(model, max_batch_size=2, max_seq_length=32)
    p = SamplingParams(max_tokens=8, temperature=0)
    good = engine.submit(Request([1, 2, 3], p))
    engine.step()
    bad = engine.submit(Request([1, 10**6], p))  # not a token id of this model: the embedding fails
    engine.run()
    assert bad.finish_reason == "error" and "IndexError" in bad.error and bad.done.is_set()
    assert good.finish_reason == "length" and good.output_ids == lone(model, [1, 2, 3], p, 32)
    assert engine.slots == [None, None] and "IndexError" in capsys.readouterr().err
    with pytest.raises(LitModelError, match="seed must fit in 64 bits"):
        engine.submit(Request([1], SamplingParams(seed=2**70)))


@pytest.mark.slow
def test_compiled_decode_step_batches_like_alone():
    """`--compile`: the engine's decode step compiled (one graph per batch bucket) gives the eager tokens."""
    from litmodel.decode_step import make_decode_step
    from litmodel.quantize import optimize_for_decode

    model = optimize_for_decode(tiny("llama-gqa"))
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 12]]
    params = [SamplingParams(max_tokens=6 + 2 * i, temperature=0) for i in range(len(prompts))]
    step = make_decode_step(model, compile=True)
    reqs = generate_many(model, prompts, params, max_batch_size=2, max_seq_length=32, decode_step=step)
    assert [r.output_ids for r in reqs] == [lone(model, p, q, 32) for p, q in zip(prompts, params)]


@pytest.mark.parametrize("family", ["llama-gqa", "gpt2"])
def test_one_slot_is_bit_identical_to_generate(family):
    """With one slot the engine runs exactly `generate`'s math (its cache rows, masks and positions add
    nothing); with several, the logits differ only by the blocking of a batched matmul (~1e-6 here)."""
    from litmodel.decode_step import make_decode_step

    model = tiny(family)
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 12]]
    plain = make_decode_step(model)

    def capture(into):
        def step(*args):
            out = plain(*args)
            into.append(out.clone())
            return out
        return step

    for slots in (1, 3):
        engine = BatchEngine(model, max_batch_size=slots, max_seq_length=32)
        seen: list[torch.Tensor] = []
        engine.step_fn = capture(seen)
        reqs = [engine.submit(Request(p, SamplingParams(max_tokens=8, temperature=0))) for p in prompts]
        engine.run()
        engine.close()
        for i, (p, r) in enumerate(zip(prompts, reqs)):
            alone: list[torch.Tensor] = []
            assert list(generate(model, p, 8, temperature=0, max_seq_length=32, decode_step=capture(alone))) \
                == r.output_ids
            if slots == 1:  # request i ran alone in steps i*7 .. i*7+6
                assert all(torch.equal(a[0], b[0]) for a, b in zip(alone, seen[i * 7:(i + 1) * 7]))
        if slots == 3:
            assert max(float((a - b).abs().max()) for a, b in zip(alone, [s[2:3] for s in seen[-7:]])) < 1e-4
