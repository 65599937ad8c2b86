"""Sparse mixture-of-experts feed-forward block (Qwen3-MoE, Mixtral).

Routing (both families, transformers 5's code): router logits = x @ gate.weight^T in x's
dtype; probabilities = softmax over all experts in fp32; the top_k largest are kept and,
iff norm_topk_prob, divided by their sum. Mixtral always renormalizes (its own code takes
the top-k of the logits and softmaxes over those k: the same numbers). Each chosen expert
computes down(silu(gate(x)) * up(x)); the outputs are scaled by the routing weights and
summed over the k experts.

Two ways through the same math:
- `forward_torch`: plain PyTorch, one matmul pair per expert that any token chose (as
  transformers does); the CPU path, and the reference everywhere. In fp32 it equals
  transformers' Qwen3MoeSparseMoeBlock / MixtralSparseMoeBlock.
- `forward_fused`: the Triton fused-MoE kernels (kernels/fused_moe.py): routing, token
  sorting by expert and grouped GEMMs with nothing synced to the host (CUDA graphs).
`forward` takes the fused path on CUDA unless `use_triton` is cleared.

Rounding: the routing weights are rounded to x's dtype before they scale expert outputs
(Qwen3-MoE's order; Mixtral keeps them fp32 — the two agree exactly in fp32).
"""

from __future__ import annotations

import functools
import re

import torch
import torch.nn.functional as F
from torch import nn

ROUTINGS = ("softmax_topk",)
HF_STYLES = ("qwen3_moe", "mixtral")


def route_softmax_topk(logits: torch.Tensor, top_k: int,
                       norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: [tokens, num_experts] -> (weights fp32 [tokens, top_k], ids int64 [tokens, top_k])."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


@functools.cache
def _fused_moe_kernels():
    """kernels/fused_moe.py, imported on first use (CPU-only installs have no triton)."""
    from pdserve.engine.kernels import fused_moe

    return fused_moe


class SparseMoeBlock(nn.Module):
    """Top-k routed SwiGLU experts.

    Constructor args:
      hidden_size:            model width H.
      moe_intermediate_size:  each expert's intermediate width I.
      num_experts:            E experts.
      top_k:                  experts per token (num_experts_per_tok).
      norm_topk_prob:         renormalize the k kept probabilities to sum to 1
                              (Qwen3-MoE's config field; True for Mixtral).
      routing:                "softmax_topk" (the only one so far; both families).
    Activation: SiLU (gate) times up, as both families use.

    Parameters (state-dict names and shapes):
      gate.weight: [E, H]      router
      w13:         [E, 2*I, H] each expert's gate_proj rows, then its up_proj rows
      w2:          [E, H, I]   each expert's down_proj

    forward(x: [tokens, H]) -> [tokens, H] (any leading dims are flattened and restored).
    forward_torch syncs the host (it lists the experts in use): not for CUDA graphs.
    """

    def __init__(self, hidden_size: int, moe_intermediate_size: int, num_experts: int,
                 top_k: int, norm_topk_prob: bool, routing: str = "softmax_topk") -> None:
        super().__init__()
        if routing not in ROUTINGS:
            raise ValueError(f"unsupported MoE routing {routing!r} (supported: {', '.join(ROUTINGS)})")
        if not 0 < top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.hidden_size, self.inter = hidden_size, moe_intermediate_size
        self.num_experts, self.top_k = num_experts, top_k
        self.norm_topk_prob, self.routing = norm_topk_prob, routing
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * moe_intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, moe_intermediate_size))
        nn.init.normal_(self.w13, std=0.02)
        nn.init.normal_(self.w2, std=0.02)
        self.use_triton = True  # forward on CUDA takes the fused kernels

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden_size}, inter={self.inter}, experts={self.num_experts}, "
                f"top_k={self.top_k}, norm_topk_prob={self.norm_topk_prob}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., H] -> [..., H]; the paths below take [tokens, H]
        rows = x.reshape(-1, self.hidden_size)
        if x.is_cuda and self.use_triton:
            return self.forward_fused(rows).view(x.shape)
        return self.forward_torch(rows).view(x.shape)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [tokens, H] -> (weights fp32 [tokens, k], ids int64 [tokens, k])
        return route_softmax_topk(self.gate(x), self.top_k, self.norm_topk_prob)

    def forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        """Reference: loop over the experts any token chose (a host sync, as in transformers)."""
        weights, ids = self.route(x)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        # hit[e, slot, token]: token chose expert e in its slot-th place
        hit = F.one_hot(ids, self.num_experts).permute(2, 1, 0)
        for e in torch.nonzero(hit.sum(dim=(1, 2))).flatten().tolist():
            slot, token = torch.where(hit[e])
            gate, up = F.linear(x[token], self.w13[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.w2[e])  # [n, H]
            out.index_add_(0, token, y * weights[token, slot, None])
        return out

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """Triton path: router matmul in torch, everything after it in fused kernels."""
        return _fused_moe_kernels().fused_moe_block(
            x, self.gate.weight, self.w13, self.w2, self.top_k, self.norm_topk_prob)

    @torch.no_grad()
    def load_hf_weights(self, weights: dict[str, torch.Tensor], prefix: str, style: str,
                        consumed: set[str] | None = None) -> None:
        """Copy one layer's checkpoint tensors in (see load_hf_expert_weights)."""
        for name, tensor in load_hf_expert_weights(weights, prefix, style, consumed).items():
            own = self.get_parameter(name)
            if own.shape != tensor.shape:
                raise ValueError(f"{prefix}: MoE {name} has shape {tuple(tensor.shape)} in the "
                                 f"checkpoint, the model expects {tuple(own.shape)}")
            own.copy_(tensor)


# ---- checkpoint names -------------------------------------------------------------------

# per-expert names, as transformers saves both families (it fuses them in memory only)
_PER_EXPERT = {
    "qwen3_moe": ("mlp", {"gate_proj": 0, "up_proj": 1, "down_proj": 2}),
    "mixtral": ("block_sparse_moe", {"w1": 0, "w3": 1, "w2": 2}),
}


def _layer_prefix(prefix: str) -> str:
    return prefix if not prefix or prefix.endswith(".") else prefix + "."


def _module_names(style: str) -> tuple[str, ...]:
    # Mixtral's MoE module is `block_sparse_moe` on disk and `mlp` in transformers 5's memory
    return ("mlp",) if style == "qwen3_moe" else ("block_sparse_moe", "mlp")


def load_hf_expert_weights(weights: dict[str, torch.Tensor], prefix: str, style: str,
                           consumed: set[str] | None = None) -> dict[str, torch.Tensor]:
    """One layer's MoE tensors from a transformers checkpoint, as SparseMoeBlock's
    parameters: {"gate.weight": [E, H], "w13": [E, 2I, H], "w2": [E, H, I]}.

    prefix: the decoder layer's, e.g. "model.layers.3." (the trailing dot optional).
    style "qwen3_moe": {prefix}mlp.gate.weight, {prefix}mlp.experts.{e}.gate_proj|up_proj|
    down_proj.weight; style "mixtral": {prefix}block_sparse_moe.gate.weight and
    ...experts.{e}.w1|w3|w2.weight (w1 = gate, w3 = up, w2 = down). Both also accept the
    fused layout of transformers 5's modules ({module}.experts.gate_up_proj [E, 2I, H],
    {module}.experts.down_proj [E, H, I]). Every name read is added to `consumed`, so a
    loader can report the tensors nobody took. Raises ValueError naming what is missing
    or inconsistent.
    """
    if style not in HF_STYLES:
        raise ValueError(f"unknown MoE checkpoint style {style!r} (known: {', '.join(HF_STYLES)})")
    prefix = _layer_prefix(prefix)
    used: set[str] = set()
    for module in _module_names(style):
        base = f"{prefix}{module}."
        if base + "gate.weight" in weights:
            break
    else:
        raise ValueError(f"no MoE router weight {prefix}{_module_names(style)[0]}.gate.weight "
                         f"in the checkpoint")
    gate = weights[base + "gate.weight"]
    used.add(base + "gate.weight")
    if base + "experts.gate_up_proj" in weights:
        w13, w2 = _fused_experts(weights, base, used)
    else:
        w13, w2 = _stack_experts(weights, base, _PER_EXPERT[style][1], used)
    _check_shapes(base, gate, w13, w2)
    if consumed is not None:
        consumed.update(used)
    return {"gate.weight": gate, "w13": w13, "w2": w2}


def _fused_experts(weights, base, used):
    names = (base + "experts.gate_up_proj", base + "experts.down_proj")
    if names[1] not in weights:
        raise ValueError(f"checkpoint has {names[0]} but no {names[1]}")
    used.update(names)
    return weights[names[0]], weights[names[1]]


def _stack_experts(weights, base, projections: dict[str, int], used):
    """Per-expert [out, in] matrices -> (w13 [E, 2I, H], w2 [E, H, I])."""
    pattern = re.compile(re.escape(base) + r"experts\.(\d+)\.(\w+)\.weight$")
    found: dict[int, list] = {}
    for name in weights:
        m = pattern.match(name)
        if m is None:
            continue
        if m.group(2) not in projections:
            raise ValueError(f"unknown expert tensor {name}")
        found.setdefault(int(m.group(1)), [None, None, None])[projections[m.group(2)]] = weights[name]
        used.add(name)
    if not found:
        raise ValueError(f"no expert weights under {base}experts.")
    num_experts = max(found) + 1
    proj_names = list(projections)
    for e in range(num_experts):
        parts = found.get(e, [None, None, None])
        missing = [proj_names[i] for i, t in enumerate(parts) if t is None]
        if missing:
            raise ValueError(f"checkpoint lacks {base}experts.{e}.{missing[0]}.weight")
        shapes = [tuple(t.shape) for t in parts]
        if shapes[0] != shapes[1] or shapes[2] != tuple(found[0][2].shape) or \
                shapes[0] != tuple(found[0][0].shape):
            raise ValueError(f"{base}experts.{e}: projection shapes {shapes} differ from "
                             f"expert 0's")
    w13 = torch.stack([torch.cat([found[e][0], found[e][1]]) for e in range(num_experts)])
    w2 = torch.stack([found[e][2] for e in range(num_experts)])
    return w13, w2


def _check_shapes(base, gate, w13, w2) -> None:
    num_experts, hidden = gate.shape
    if w13.dim() != 3 or w2.dim() != 3 or w13.shape[0] != num_experts or w2.shape[0] != num_experts:
        raise ValueError(f"{base}: router has {num_experts} experts but expert weights are "
                         f"{tuple(w13.shape)} and {tuple(w2.shape)}")
    inter = w2.shape[2]
    if w13.shape[1:] != (2 * inter, hidden) or w2.shape[1] != hidden:
        raise ValueError(f"{base}: expert shapes {tuple(w13.shape)} / {tuple(w2.shape)} do not "
                         f"fit hidden {hidden}, intermediate {inter}")


def load_gguf_expert_weights(tensors: dict[str, torch.Tensor], layer: int,
                             consumed: set[str] | None = None) -> dict[str, torch.Tensor]:
    """One layer's MoE tensors from a GGUF as llama.cpp's converter writes them (Mixtral
    as arch `llama`, Qwen3-MoE as `qwen3moe`), dequantized, in numpy's (reversed ggml)
    order: blk.{layer}.ffn_gate_inp.weight [E, H]; ffn_gate_exps / ffn_up_exps [E, I, H]
    (or one ffn_gate_up_exps [E, 2I, H]); ffn_down_exps [E, H, I]. Returns SparseMoeBlock's
    parameters as load_hf_expert_weights does; names read go into `consumed`."""
    base = f"blk.{layer}."
    names = {key: f"{base}{key}.weight" for key in
             ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_gate_up_exps", "ffn_down_exps")}
    fused = names["ffn_gate_up_exps"] in tensors
    needed = ["ffn_gate_inp", "ffn_down_exps"] + (
        ["ffn_gate_up_exps"] if fused else ["ffn_gate_exps", "ffn_up_exps"])
    missing = [names[k] for k in needed if names[k] not in tensors]
    if missing:
        raise ValueError(f"GGUF lacks MoE tensor {missing[0]}")
    if fused:
        w13 = tensors[names["ffn_gate_up_exps"]]
    else:
        gate, up = tensors[names["ffn_gate_exps"]], tensors[names["ffn_up_exps"]]
        if gate.shape != up.shape:
            raise ValueError(f"{names['ffn_gate_exps']} {tuple(gate.shape)} and "
                             f"{names['ffn_up_exps']} {tuple(up.shape)} differ")
        w13 = torch.cat([gate, up], dim=1)
    gate_inp, w2 = tensors[names["ffn_gate_inp"]], tensors[names["ffn_down_exps"]]
    _check_shapes(base, gate_inp, w13, w2)
    if consumed is not None:
        consumed.update(names[k] for k in needed)
    return {"gate.weight": gate_inp, "w13": w13, "w2": w2}
