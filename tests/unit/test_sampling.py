"""SamplingParams validation, logit filtering and the sampler."""

from __future__ import annotations

import math

import pytest
import torch

from pdserve.engine.sampling import (InvalidRequest, SamplingParams, filter_logits,
                                     make_generator, sample)

NEG_INF = float("-inf")


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_tokens=0), "max_tokens must be >= 1"),
    (dict(max_tokens=-3), "max_tokens must be >= 1"),
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(temperature=math.nan), "temperature must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_p=-0.2), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(stop=("ok", "")), "stop strings must not be empty"),
])
def test_invalid_params_are_refused_with_a_clear_message(kwargs, message):
    with pytest.raises(InvalidRequest, match=message):
        SamplingParams(**kwargs)


def test_invalid_request_is_a_value_error():
    assert issubclass(InvalidRequest, ValueError)


def test_edge_values_are_accepted():
    p = SamplingParams(max_tokens=1, temperature=0.0, top_p=1.0, top_k=0, stop=["a"])
    assert p.greedy and p.stop == ("a",)  # lists become tuples: params stay hashable
    assert not SamplingParams(temperature=0.5).greedy


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    out = filter_logits(logits, top_k=2, top_p=1.0)
    assert out.tolist() == [NEG_INF, 5.0, NEG_INF, 4.0, NEG_INF]


def test_top_k_off_or_larger_than_vocab_keeps_everything():
    logits = torch.tensor([1.0, 5.0, 3.0])
    assert torch.equal(filter_logits(logits, top_k=0, top_p=1.0), logits)
    assert torch.equal(filter_logits(logits, top_k=3, top_p=1.0), logits)


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    # probabilities 0.5, 0.05, 0.3, 0.15 (log-probabilities as logits)
    logits = torch.tensor([0.5, 0.05, 0.3, 0.15]).log()
    keep = lambda p: (filter_logits(logits, 0, p) > NEG_INF).tolist()  # noqa: E731
    assert keep(0.5) == [True, False, False, False]  # the top token alone reaches 0.5
    assert keep(0.6) == [True, False, True, False]  # 0.5 < 0.6: the next one joins
    assert keep(0.85) == [True, False, True, True]
    assert keep(0.97) == [True, True, True, True]
    assert keep(1.0) == [True, True, True, True]


def test_top_p_always_keeps_the_most_likely_token():
    logits = torch.tensor([0.0, 10.0, 1.0])
    assert (filter_logits(logits, 0, 1e-9) > NEG_INF).tolist() == [False, True, False]


def test_top_k_then_top_p():
    logits = torch.tensor([0.1, 0.2, 0.3, 0.4]).log()
    # top-2 leaves 0.4 and 0.3 (renormalised 4/7, 3/7); top_p 0.5 keeps the first only
    out = filter_logits(logits, top_k=2, top_p=0.5)
    assert (out > NEG_INF).tolist() == [False, False, False, True]


def _draws(seed: int, n: int = 20) -> list[int]:
    logits = torch.zeros(1, 50)  # uniform: any bias would show
    gen = make_generator(seed, torch.device("cpu"))
    params = [SamplingParams(temperature=1.0, seed=seed)]
    return [sample(logits, params, [gen])[0] for _ in range(n)]


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    assert _draws(7) == _draws(7)
    assert _draws(7) != _draws(8)


def test_huge_seeds_are_accepted():
    assert _draws(2**64 + 5) == _draws(5)  # folded to 64 bits


def test_greedy_rows_stay_argmax_in_a_mixed_batch():
    torch.manual_seed(0)
    logits = torch.randn(4, 32)
    params = [SamplingParams(), SamplingParams(temperature=5.0, seed=1),
              SamplingParams(), SamplingParams(temperature=5.0, seed=2)]
    gens = [None, make_generator(1, torch.device("cpu")), None,
            make_generator(2, torch.device("cpu"))]
    argmax = logits.argmax(-1).tolist()
    for _ in range(10):
        out = sample(logits, params, gens)
        assert out[0] == argmax[0] and out[2] == argmax[2]


def test_sampled_rows_respect_top_k():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    gen = make_generator(3, torch.device("cpu"))
    p = [SamplingParams(temperature=10.0, top_k=2)]
    seen = {sample(logits, p, [gen])[0] for _ in range(200)}
    assert seen == {3, 4}  # hot temperature: both kept tokens appear, nothing else


def test_seeded_row_draws_the_same_whatever_shares_its_batch():
    torch.manual_seed(1)
    logits = torch.randn(3, 40)
    seeded = SamplingParams(temperature=1.0, seed=42)

    def run(batch_rows):
        gens = [make_generator(42, torch.device("cpu")) if p is seeded else
                make_generator(i, torch.device("cpu")) for i, p in enumerate(batch_rows)]
        i = batch_rows.index(seeded)
        rows = torch.stack([logits[1] if p is seeded else logits[j]
                            for j, p in enumerate(batch_rows)])
        return [sample(rows, batch_rows, gens)[i] for _ in range(8)]

    alone = run([seeded])
    mixed = run([SamplingParams(temperature=0.7), seeded, SamplingParams()])
    assert alone == mixed
