"""The sampler: greedy, temperature, top-k, top-p, seed.

The whole batch is sampled at once: top-k / top-p take one sort over the rows that use
them, and the step ends in a single host sync. A token is drawn by an exponential race,
argmax(probs / q) with q ~ Exp(1), which picks token i with probability probs[i] exactly
(and is how torch.multinomial draws one sample, so a generator yields the tokens one
multinomial per row yielded). Each request owns a torch.Generator and its row's q comes
from it alone, so a seeded request draws the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import math

import torch

# re-exported: their home is pdserve.engine.params (torch-free)
from pdserve.engine.params import InvalidRequest, SamplingParams  # noqa: F401

_NEG_INF = float("-inf")
# every top-k up to this: torch.topk (a selection) applies it; beyond, the top-p sort does
_TOPK_SELECT_MAX_K = 1024


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return gen


def _to(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small per-row host tensor on `device`; on CUDA through pinned memory and
    asynchronous, so the step keeps its single host sync."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask everything outside top-k, then outside the top-p nucleus. logits: [vocab]."""
    return filter_rows(logits[None], [top_k], [top_p])[0]


def filter_rows(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Row i: mask everything outside its top_k[i] (0 = off), then outside its top_p[i]
    nucleus (1.0 = off). logits: [num_rows, vocab]; rows without a filter are not touched."""
    vocab = logits.shape[-1]
    rows = [i for i, (k, p) in enumerate(zip(top_k, top_p)) if 0 < k < vocab or p < 1.0]
    if not rows:
        return logits
    # neutral values for a row that has only the other filter: k = vocab keeps the row
    # minimum and up, p = inf never drops
    ks = [top_k[i] if 0 < top_k[i] < vocab else vocab for i in rows]
    ps = [top_p[i] if top_p[i] < 1.0 else math.inf for i in rows]
    if len(rows) == len(top_k):
        return _mask(logits, ks, ps)
    index = _to(torch.tensor(rows), logits.device)  # [filtered rows]
    return logits.index_copy(0, index, _mask(logits.index_select(0, index), ks, ps))


def _mask(logits: torch.Tensor, ks: list[int], ps: list[float]) -> torch.Tensor:
    # logits: [rows, vocab], every row with a top-k or a top-p
    top_k: list[int] | None = ks
    if max(ks) <= _TOPK_SELECT_MAX_K:
        # every row has a small top-k: a selection, no sort; a top-p sort then orders
        # rows that are nearly all -inf (several times cheaper on the CPU)
        logits, top_k = _mask_top_k(logits, ks), None
    if min(ps) == math.inf and top_k is None:  # no top-p anywhere
        return logits
    return _mask_sorted(logits, top_k, ps)


def _mask_top_k(logits: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """top-k by selection (torch.topk of the largest k in the batch)."""
    k = _to(torch.tensor(ks), logits.device)  # [rows]
    # kth: [rows, 1], the k-th largest logit; ties with it stay in
    kth = torch.topk(logits, max(ks), dim=-1).values.gather(-1, k[:, None] - 1)
    return logits.masked_fill(logits < kth, _NEG_INF)


def _mask_sorted(logits: torch.Tensor, ks: list[int] | None, ps: list[float]) -> torch.Tensor:
    """top-k (None: already applied) then top-p over one sort of all the rows. Stable:
    among equal logits the lower token id comes first, which decides which of them the
    top-p boundary keeps."""
    p = _to(torch.tensor(ps, dtype=torch.float32), logits.device)  # [rows]
    # ordered, order: [rows, vocab], descending
    ordered, order = logits.sort(dim=-1, descending=True, stable=True)
    if ks is not None:
        k = _to(torch.tensor(ks), logits.device)  # [rows]
        kth = ordered.gather(-1, k[:, None] - 1)  # [rows, 1]
        ordered = ordered.masked_fill(ordered < kth, _NEG_INF)
    probs = ordered.softmax(-1)  # [rows, vocab]
    # drop a token once the mass before it already reaches top_p (the top one stays)
    drop = (probs.cumsum(-1) - probs) >= p[:, None]
    ordered.masked_fill_(drop, _NEG_INF)
    return torch.empty_like(logits).scatter_(-1, order, ordered)


def _race_noise(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """q: [rows, vocab], q ~ Exp(1), row i drawn from generators[i] (None: torch's default).
    The very draw torch.multinomial(probs_row, 1, generator=gen) makes, and
    torch.Tensor.exponential_ never returns 0, so probs / q has no 0/0."""
    q = torch.empty_like(probs)
    # One draw per row: torch cannot fill one tensor from several generators, and a row's
    # numbers must come from its own generator alone for batch independence. Each is a
    # plain fill, no sort and no sync.
    for row, gen in zip(q, generators):
        row.exponential_(generator=gen)
    return q


def _scale(logits: torch.Tensor, temperatures: list[float]) -> torch.Tensor:
    """logits / T per row, rounded as `row / float` rounds on each device (CUDA multiplies
    by the fp32 reciprocal), so seeded requests draw the tokens the per-row sampler drew."""
    t = torch.tensor(temperatures, dtype=torch.float32)  # [rows]
    if logits.device.type != "cuda":
        return logits / t[:, None]
    return logits * _to(t.reciprocal(), logits.device)[:, None]


def _draw(logits: torch.Tensor, params: list[SamplingParams],
          generators: list[torch.Generator | None]) -> torch.Tensor:
    """logits: [rows, vocab] of non-greedy rows -> token ids [rows], still on the device."""
    scaled = _scale(logits, [p.temperature for p in params])  # [rows, vocab]
    # T so small that logits / T overflows: the overflowed tokens tie (a NaN softmax before)
    scaled.clamp_(max=torch.finfo(scaled.dtype).max)
    scaled = filter_rows(scaled, [p.top_k for p in params], [p.top_p for p in params])
    probs = scaled.softmax(-1)  # [rows, vocab]
    # exponential race: argmax(probs / q), q ~ Exp(1), is categorical(probs) exactly
    return probs.div_(_race_noise(probs, generators)).argmax(-1)


def suppress(logits: torch.Tensor, banned: list[tuple[int, ...]]) -> torch.Tensor:
    """Row i with its banned[i] token ids at -inf (ids outside the vocabulary ignored);
    logits: [num_rows, vocab], returned as is when nothing is banned, else a copy."""
    vocab = logits.shape[-1]
    pairs = [(row, t) for row, ids in enumerate(banned) for t in ids if 0 <= t < vocab]
    if not pairs:
        return logits
    rows, cols = zip(*pairs)
    index = _to(torch.tensor([rows, cols]), logits.device)  # [2, num_banned]
    return logits.index_put((index[0], index[1]),
                            torch.tensor(_NEG_INF, dtype=logits.dtype, device=logits.device))


def sample_tokens(logits: torch.Tensor, params: list[SamplingParams],
                  generators: list[torch.Generator | None],
                  banned: list[tuple[int, ...]] | None = None) -> torch.Tensor:
    """logits: [num_rows, vocab] fp32 -> token ids [num_rows] int64, on logits' device;
    queues the work and never waits for the device. banned[i]: ids row i must not draw
    (min_tokens)."""
    if banned:
        logits = suppress(logits, banned)
    if all(p.greedy for p in params):
        return logits.argmax(-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if len(rows) == len(params):
        return _draw(logits, params, generators)
    index = _to(torch.tensor(rows), logits.device)  # [sampled rows]
    drawn = _draw(logits.index_select(0, index), [params[i] for i in rows],
                  [generators[i] for i in rows])
    return logits.argmax(-1).index_copy_(0, index, drawn)


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None],
           banned: list[tuple[int, ...]] | None = None) -> list[int]:
    """logits: [num_rows, vocab] fp32 -> one token id per row (one host sync)."""
    return sample_tokens(logits, params, generators, banned).tolist()
