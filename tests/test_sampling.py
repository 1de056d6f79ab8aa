"""litmodel.sampling: top-k / top-p filters (as transformers' warpers), the sampled distribution, greedy at
temperature 0 (moved from tests/test_generate.py)."""

from __future__ import annotations

import pytest
import torch

from litmodel.sampling import make_generator, sample_logits, sampling_probs, top_k_top_p_filter

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.randn(4, 50)
    for k in (1, 5, 49):
        kept = torch.isfinite(top_k_top_p_filter(logits, top_k=k))
        expected = torch.zeros_like(kept).scatter(-1, logits.topk(k, dim=-1).indices, True)
        assert torch.equal(kept, expected)
    assert torch.equal(top_k_top_p_filter(logits, top_k=None), logits)


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log()
    for top_p, expected in [(0.45, {1}), (0.55, {1, 3}), (0.75, {1, 3}), (0.85, {1, 3, 2}), (0.97, {0, 1, 2, 3}),
                            (1.0, {0, 1, 2, 3})]:
        kept = set(torch.isfinite(top_k_top_p_filter(logits, top_p=top_p)).nonzero().flatten().tolist())
        assert kept == expected, top_p


def test_filters_match_transformers_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(3)
    logits = torch.randn(8, 200) * 3
    for top_k, top_p in [(10, 1.0), (None, 0.9), (None, 0.3), (20, 0.8)]:
        ref = logits.clone()
        if top_k:
            ref = TopKLogitsWarper(top_k)(None, ref)
        if top_p < 1:
            ref = TopPLogitsWarper(top_p)(None, ref)
        ours = top_k_top_p_filter(logits, top_k, top_p)
        assert torch.equal(torch.isfinite(ours), torch.isfinite(ref)), (top_k, top_p)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sampling_distribution_is_softmax_of_logits_over_temperature(temperature):
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0])
    expected = torch.softmax(logits / temperature, dim=-1)
    assert torch.allclose(sampling_probs(logits, temperature), expected, atol=1e-6)
    n = 40000
    draws = sample_logits(logits.expand(n, -1), temperature, generator=make_generator(0))
    freq = torch.bincount(draws, minlength=5).float() / n
    assert (freq - expected).abs().max() < 0.015, (freq, expected)


def test_temperature_zero_is_greedy_and_top_k_1_too():
    logits = torch.randn(16, 30)
    assert torch.equal(sample_logits(logits, 0.0), logits.argmax(-1))
    assert torch.equal(sample_logits(logits, 1.0, top_k=1, generator=make_generator(1)), logits.argmax(-1))


def test_sampling_only_draws_kept_tokens():
    logits = torch.randn(1, 100).expand(5000, -1)
    draws = sample_logits(logits, 1.5, top_k=7, generator=make_generator(2))
    assert set(draws.tolist()) <= set(logits[0].topk(7).indices.tolist())
