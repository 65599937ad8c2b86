"""SamplingParams validation, logit filtering and the sampler."""

from __future__ import annotations

import math

import pytest
import torch

from pdserve.engine.sampling import (InvalidRequest, SamplingParams, filter_logits,
                                     filter_rows, make_generator, sample)

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


# ---- the batched sampler against the per-row one it replaced ---------------------------

CPU = torch.device("cpu")


def _per_row_filter(logits: torch.Tensor, top_k: int, top_p: float, stable: bool = True):
    """The per-row filter the batched one replaced (stable: ties in token-id order)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, NEG_INF)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, stable=stable)
        probs = sorted_logits.softmax(-1)
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), NEG_INF)
    return logits


# (top_k, top_p); a top-k over 1024 sends the whole batch down the sort path
FILTERS = [(0, 1.0), (1, 1.0), (3, 1.0), (7, 1.0), (0, 0.3), (0, 0.9), (0, 0.999),
           (5, 0.5), (2, 0.95), (40, 0.8), (64, 1.0), (100, 0.7), (1, 0.2), (1100, 1.0),
           (1200, 0.9)]


@pytest.mark.parametrize("vocab", [64, 1500])
@pytest.mark.parametrize("ties", [False, True])
def test_batched_filter_keeps_what_the_per_row_filter_kept(ties, vocab):
    g = torch.Generator().manual_seed(11)
    rows = []
    for _ in range(6):  # every filter on several rows, mixed in one batch
        for _ in FILTERS:
            row = torch.randn(vocab, generator=g) * 3
            rows.append(row.round() if ties else row)  # rounded: many equal logits
    logits = torch.stack(rows)  # [num_rows, vocab]
    ks = [k for _ in range(6) for k, _ in FILTERS]
    ps = [p for _ in range(6) for _, p in FILTERS]
    out = filter_rows(logits, ks, ps)
    # without ties the literal old code (unstable sort) agrees value for value
    want = torch.stack([_per_row_filter(r, k, p, stable=ties) for r, k, p in zip(logits, ks, ps)])
    assert torch.equal(out, want)
    # each filter alone in its batch takes the same decision (top-k alone: selection path)
    for i in range(0, len(ks), 7):  # 7 and 15 coprime: every filter once or more
        assert torch.equal(filter_rows(logits[i:i + 1], ks[i:i + 1], ps[i:i + 1])[0], want[i])


def test_top_p_boundary_among_equal_logits_keeps_the_lowest_token_ids():
    # probabilities 0.4, 0.2, 0.2, 0.2: the nucleus of 0.5 needs one of three equal tokens
    logits = torch.tensor([0.2, 0.4, 0.2, 0.2]).log()
    assert (filter_logits(logits, 0, 0.5) > NEG_INF).tolist() == [True, True, False, False]
    # top-k keeps every token equal to the k-th largest
    assert (filter_logits(logits, 2, 1.0) > NEG_INF).tolist() == [True, True, True, True]


def test_rows_without_filters_are_untouched():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 50, generator=g)
    assert filter_rows(logits, [0, 0, 50, 0], [1.0, 1.0, 1.0, 1.0]) is logits
    out = filter_rows(logits, [0, 5, 50, 0], [1.0, 1.0, 1.0, 0.5])
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    assert (out[1] > NEG_INF).sum() == 5 and (out[3] > NEG_INF).sum() < 50


def _seeded_run(rows: list[tuple[torch.Tensor, SamplingParams]],
                steps: int = 6) -> list[list[int]]:
    """Sample `steps` times; every non-greedy row owns a generator from its seed (None: the
    default generator)."""
    logits = torch.stack([r for r, _ in rows])
    params = [p for _, p in rows]
    gens = [make_generator(p.seed, CPU) if p.seed is not None and not p.greedy else None
            for p in params]
    return [sample(logits, params, gens) for _ in range(steps)]


@pytest.mark.parametrize("mine", [
    SamplingParams(temperature=1.0, seed=42),
    SamplingParams(temperature=0.8, top_p=0.9, seed=42),
    SamplingParams(temperature=1.3, top_k=20, seed=42),
    SamplingParams(temperature=1.1, top_k=30, top_p=0.7, seed=42),
])
def test_seeded_row_draws_the_same_alone_and_in_any_batch(mine):
    g = torch.Generator().manual_seed(5)
    row = lambda: torch.randn(200, generator=g) * 2  # noqa: E731
    x = row()
    others = [(row(), SamplingParams()),  # greedy
              (row(), SamplingParams(temperature=1.0, seed=7)),
              (row(), SamplingParams(temperature=0.9, top_p=0.5, seed=8)),
              (row(), SamplingParams(temperature=0.9, top_k=3, seed=9)),  # selection path
              (row(), SamplingParams(temperature=2.0, top_k=500))]  # unseeded, k > vocab
    me = (x, mine)
    alone = [step[0] for step in _seeded_run([me])]
    assert len(set(alone)) > 1  # really sampled
    for batch in ([me] + others, others[:2] + [me] + others[2:], others[::-1] + [me],
                  [others[0], me], [others[3], me]):
        at = next(i for i, row in enumerate(batch) if row is me)
        assert [step[at] for step in _seeded_run(batch)] == alone


def test_top_k_1_is_greedy_and_neutral_filters_change_nothing():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(8, 300, generator=g)
    top1 = [SamplingParams(temperature=t, top_k=1, seed=i)
            for i, t in enumerate([0.5, 1, 3, 9] * 2)]
    for step in _seeded_run(list(zip(logits, top1)), steps=5):
        assert step == logits.argmax(-1).tolist()
    plain = SamplingParams(temperature=1.0, seed=3)
    sorter = (logits[1], SamplingParams(temperature=1.0, top_p=0.5, seed=1))  # a sort in the batch
    want = [step[0] for step in _seeded_run([(logits[0], plain)])]
    for neutral in (plain, SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=3),
                    SamplingParams(temperature=1.0, top_k=300, seed=3)):  # k = vocab: off
        assert [step[0] for step in _seeded_run([(logits[0], neutral), sorter])] == want


def test_mixed_batch_greedy_rows_are_argmax_and_sampled_rows_stay_in_their_filter():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(5, 100, generator=g)
    params = [SamplingParams(), SamplingParams(temperature=2.0, top_k=4, seed=1),
              SamplingParams(), SamplingParams(temperature=2.0, top_p=0.3, seed=2),
              SamplingParams(temperature=5.0, seed=3)]
    allowed = [set((_per_row_filter(logits[i] / p.temperature, p.top_k, p.top_p) > NEG_INF)
                   .nonzero().flatten().tolist()) for i, p in enumerate(params) if not p.greedy]
    seen = [set(), set(), set()]
    for step in _seeded_run(list(zip(logits, params)), steps=60):
        assert step[0] == logits[0].argmax() and step[2] == logits[2].argmax()
        for s, token in zip(seen, (step[1], step[3], step[4])):
            s.add(token)
    assert seen[0] == allowed[0] and seen[1] <= allowed[1] and len(seen[1]) > 1
    assert seen[2] <= allowed[2] and len(seen[2]) > 10


def test_temperature_close_to_zero_is_greedy():
    logits = torch.tensor([[0.5, 4.0, -1.0, 3.9, 2.0], [1.0, 0.0, 1.05, -3.0, 0.9]])
    for t in (1e-3, 1e-4, 1e-6):
        params = [SamplingParams(temperature=t, seed=1), SamplingParams(temperature=t, top_p=0.9)]
        for step in _seeded_run(list(zip(logits, params)), steps=20):
            assert step == [1, 2]
    # logits / T overflows float32 for the top token only: the per-row sampler raised
    # (NaN softmax), now it is greedy
    tiny = [SamplingParams(temperature=1e-38, seed=1)] * 2
    logits = torch.tensor([[0.5, 4.0, -1.0, 2.9, 2.0], [1.0, 0.0, 3.5, -3.0, 0.9]])
    assert _seeded_run(list(zip(logits, tiny)), steps=3) == [[1, 2]] * 3


def _per_row_sample(logits, params, generators) -> list[int]:
    """The per-row sampler the batched one replaced: filter, softmax, multinomial per row."""
    out = logits.argmax(-1).tolist()
    for i, (p, gen) in enumerate(zip(params, generators)):
        if not p.greedy:
            row = _per_row_filter(logits[i] / p.temperature, p.top_k, p.top_p, stable=False)
            out[i] = int(torch.multinomial(row.softmax(-1), 1, generator=gen))
    return out


def test_same_generators_draw_the_tokens_the_per_row_sampler_drew():
    # torch.multinomial draws one sample by the same exponential race
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(12, 3000, generator=g) * 2  # [rows, vocab], no equal logits
    params = [SamplingParams(), SamplingParams(temperature=0.7, seed=1),
              SamplingParams(temperature=1.0, top_k=40, seed=2), SamplingParams(),
              SamplingParams(temperature=1.2, top_p=0.9, seed=3),
              SamplingParams(temperature=0.9, top_k=100, top_p=0.8, seed=4),
              SamplingParams(temperature=1.5, top_k=2000, seed=5),  # sort path for top-k
              SamplingParams(temperature=2.0, top_p=0.5), SamplingParams(temperature=0.3),
              SamplingParams(temperature=1.0, top_k=1, seed=6), SamplingParams(),
              SamplingParams(temperature=1.0, top_p=0.99, seed=7)]
    gens = lambda: [None if p.greedy else make_generator(i, CPU)  # noqa: E731
                    for i, p in enumerate(params)]
    old, new = gens(), gens()
    for _ in range(5):
        assert sample(logits, params, new) == _per_row_sample(logits, params, old)


# ---- the exponential race draws from the categorical distribution --------------------

# chi-square quantiles at 0.999 by degrees of freedom: a right test fails 1 time in 1000
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def _chi2(counts: torch.Tensor, probs: torch.Tensor, n: int) -> float:
    support = probs > 0
    expected = probs[support] * n
    return float(((counts[support] - expected) ** 2 / expected).sum())


def _expected(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    return _per_row_filter(logits / p.temperature, p.top_k, p.top_p).softmax(-1).double()


LOGITS8 = torch.tensor([1.2, 0.3, -0.5, 2.0, 0.0, 1.9, -2.0, 0.8])


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.6),
    SamplingParams(temperature=2.5, top_k=3),
    SamplingParams(temperature=1.0, top_p=0.8),
    SamplingParams(temperature=1.5, top_k=5, top_p=0.9),
])
def test_draws_follow_the_filtered_softmax(params):
    n = 6000
    # one row per draw, each with its own generator (the engine's per-request generators)
    gens = [make_generator(1000 + i, CPU) for i in range(n)]
    tokens = sample(LOGITS8.expand(n, -1), [params] * n, gens)
    counts = torch.bincount(torch.tensor(tokens), minlength=8).double()
    probs = _expected(LOGITS8, params)
    assert counts[probs == 0].sum() == 0  # nothing outside top-k / top-p
    df = int((probs > 0).sum()) - 1
    if df:
        assert _chi2(counts, probs, n) < CHI2_999[df]
    assert (counts / n - probs).abs().max() < 0.025


def test_sequential_draws_of_one_seeded_request_follow_the_softmax():
    params = [SamplingParams(temperature=0.8, top_p=0.95, seed=3)]
    gen = make_generator(3, CPU)
    n = 3000
    tokens = [sample(LOGITS8[None], params, [gen])[0] for _ in range(n)]
    counts = torch.bincount(torch.tensor(tokens), minlength=8).double()
    probs = _expected(LOGITS8, params[0])
    df = int((probs > 0).sum()) - 1
    assert _chi2(counts, probs, n) < CHI2_999[df]
    # and the test can tell: the unfiltered temperature-1 distribution is rejected
    assert _chi2(counts, LOGITS8.softmax(-1).double(), n) > CHI2_999[7]
