"""The `moe` ffn plugin: one routed mixture-of-experts layer, parameterized.

Its options cover the published routers (the YAML variants in conf/ffn/ set them):

- router: softmax top-k (Mixtral, Qwen-MoE, Switch) or sigmoid scores with a
  per-expert selection bias (DeepSeek-V3), optionally group-limited;
- auxiliary-loss-free balancing (DeepSeek-V3): `after_optimizer_step()` nudges
  the selection bias towards under-loaded experts;
- shared experts, always on, optionally gated (DeepSeek, Qwen2-MoE);
- biases on the router and on each expert's up and down projections (gpt-oss);
- expert capacity (Switch): slots beyond an expert's capacity are dropped;
- the balance loss and the router z-loss (ST-MoE) as the auxiliary loss.

Experts run only on the tokens routed to them (grouped dispatch): the routing
slots (token, choice) are sorted by expert id, each token's row is gathered once
per slot, and the expert weights multiply contiguous row groups through
`grouped_mm` (grouped_mm.py: `torch._grouped_mm` in bf16, otherwise an opaque
custom op looping `mm` over the groups). The slots' outputs return to token
order through the inverse permutation and are summed with the routing weights.

Why this shape: every tensor the compiler sees has a static size (slots =
tokens x top_k rows; offsets [experts]), and the data-dependent group sizes stay
inside the grouped product, so `torch.compile(fullgraph=True)` traces the layer
with no graph break, no recompiles and no unbacked sizes, forward and backward,
while the matrix work is exactly that of the chosen experts in blocks as large
as the groups. The alternatives lose on the CPU: running every expert on every
token costs num_experts / top_k times the work; a padded batch sized for the
worst case (all tokens on one expert) multiplies the work by num_experts again,
and one sized by capacity drops tokens; reading the group sizes in traced code
(`.tolist()` and `torch.split`) needs capture_scalar_outputs and carries sizes
unknown at compile time, possibly zero, through every op after the split. On the
CPU the loop's `mm` calls run at the rate of plain `mm` on the same shapes
(benchmarks/bench_moe.py measures it).

A slot beyond its expert's capacity is sorted past the last group, so no expert
computes it; it then contributes zero, or (dropped=identity) its weight times
the input, as before. Expert biases are added per row, looked up by the row's expert
(`Dispatch.expert`) outside the grouped product, so both of its kernels get them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from omegaconf import SI
from torch import nn

from llmarch_compose import ConfigError, FeedForward, FeedForwardOutput, PreciseBuffers, register
from llmarch_compose.errors import valid_divisors, valid_range

from .dense import DenseFFN, DenseParams, gated_product
from .grouped_mm import grouped_mm

ROUTERS = ("softmax", "sigmoid")
DROPPED = ("zero", "identity")
#: DeepSeek-V3 rates a group of experts by the sum of its best two selection scores.
GROUP_SCORE_TOP = 2


@dataclass
class MoEParams:
    num_experts: int = SI("${model.n_experts}")
    top_k: int = SI("${model.experts_per_token}")
    hidden: int = SI("${model.expert_ffn_dim}")  # each expert's hidden width
    normalize_top_k: bool = True  # renormalize the chosen experts' weights to sum to one (Mixtral)
    aux_loss_coef: float = SI("${model.router_aux_loss_coef}")
    # softmax: probabilities over experts; sigmoid: independent scores (DeepSeek-V3)
    router: str = "softmax"
    n_groups: int = SI("${model.n_expert_groups}")  # group-limited routing: choose only from
    topk_groups: int = SI("${model.topk_expert_groups}")  # the best topk_groups of n_groups groups
    routed_scaling: float = SI("${model.routed_scaling_factor}")  # multiplies the routed weights
    # Auxiliary-loss-free balancing: after each optimizer step the selection bias of
    # every expert moves by this much towards the mean load; 0 disables it.
    bias_update_rate: float = 0.0
    shared_experts: int = SI("${model.n_shared_experts}")  # always-on experts, `hidden` wide each
    shared_gate: bool = False  # scale the shared output by sigmoid(x w) (Qwen2-MoE)
    # Expert capacity per sequence: ceil(capacity_factor * seq_len * top_k / num_experts)
    # routing slots, or `capacity` slots; None for both: dropless.
    capacity_factor: Optional[float] = SI("${model.expert_capacity_factor}")
    capacity: Optional[int] = SI("${model.expert_capacity}")
    dropped: str = "zero"  # a dropped slot contributes zero, or its weight times the input
    z_loss_coef: float = SI("${model.router_z_loss_coef}")
    expert_bias: bool = False  # a bias on each routed expert's up (gate | up) and down projections (gpt-oss)
    router_bias: bool = False  # a bias on the router's logits (gpt-oss)

    def validate(self, model, key):
        self._validate_sizes(key)
        self._validate_routing(key)
        self._validate_capacity(key)
        for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key}.{name}", getattr(self, name), "must not be negative", "a number >= 0")

    def _validate_sizes(self, key):
        if self.num_experts < 1:
            raise ConfigError(f"{key}.num_experts", self.num_experts, "must be positive", "an integer >= 1")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"{key}.top_k", self.top_k,
                              f"must lie between 1 and num_experts={self.num_experts}",
                              valid_range(1, self.num_experts))
        if self.hidden < 1:
            raise ConfigError(f"{key}.hidden", self.hidden, "must be positive", "an integer >= 1")
        if self.shared_experts < 0:
            raise ConfigError(f"{key}.shared_experts", self.shared_experts, "must not be negative",
                              "an integer >= 0")
        if self.shared_gate and self.shared_experts == 0:
            raise ConfigError(f"{key}.shared_gate", self.shared_gate, "gates the shared experts, but there are none",
                              "false, or set shared_experts >= 1")

    def _validate_routing(self, key):
        if self.router not in ROUTERS:
            raise ConfigError(f"{key}.router", self.router, "unknown router", ROUTERS)
        if self.n_groups < 1 or self.num_experts % self.n_groups:
            raise ConfigError(f"{key}.n_groups", self.n_groups,
                              f"must divide num_experts={self.num_experts}",
                              valid_divisors(self.num_experts, self.n_groups))
        if not 1 <= self.topk_groups <= self.n_groups:
            raise ConfigError(f"{key}.topk_groups", self.topk_groups,
                              f"must lie between 1 and n_groups={self.n_groups}", valid_range(1, self.n_groups))
        eligible = self.topk_groups * (self.num_experts // self.n_groups)
        if self.top_k > eligible:
            raise ConfigError(f"{key}.top_k", self.top_k,
                              f"must not exceed the {eligible} experts in the topk_groups={self.topk_groups} "
                              f"selected groups of {self.num_experts // self.n_groups}", valid_range(1, eligible))
        if not self.routed_scaling > 0:
            raise ConfigError(f"{key}.routed_scaling", self.routed_scaling, "must be positive", "a number > 0")

    def _validate_capacity(self, key):
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ConfigError(f"{key}.capacity_factor", self.capacity_factor, "must be positive",
                              "a number > 0, or null for no capacity limit")
        if self.capacity is not None and self.capacity < 1:
            raise ConfigError(f"{key}.capacity", self.capacity, "an expert must hold at least one slot",
                              "an integer >= 1, or null")
        if self.capacity is not None and self.capacity_factor is not None:
            raise ConfigError(f"{key}.capacity", self.capacity,
                              f"conflicts with capacity_factor={self.capacity_factor}; set one of them",
                              "null, or set capacity_factor to null")
        if self.dropped not in DROPPED:
            raise ConfigError(f"{key}.dropped", self.dropped, "unknown treatment of dropped tokens", DROPPED)


# ------------------------------------------------------------------------- routing


class Routing(NamedTuple):
    logits: torch.Tensor  # [tokens, experts], float32
    scores: torch.Tensor  # softmax probabilities or sigmoid scores, [tokens, experts]
    chosen: torch.Tensor  # [tokens, top_k] expert indices
    weights: torch.Tensor  # [tokens, top_k] the chosen experts' weights


def router_scores(logits: torch.Tensor, router: str) -> torch.Tensor:
    return torch.softmax(logits, dim=-1) if router == "softmax" else torch.sigmoid(logits)


def limit_to_groups(choice: torch.Tensor, n_groups: int, topk_groups: int) -> torch.Tensor:
    """`choice` [tokens, experts] with every expert outside the token's best
    `topk_groups` groups set to -inf; a group's score is the sum of its best two."""
    tokens, experts = choice.shape
    grouped = choice.view(tokens, n_groups, experts // n_groups)
    group_scores = grouped.topk(min(GROUP_SCORE_TOP, experts // n_groups), dim=-1).values.sum(dim=-1)
    best = group_scores.topk(topk_groups, dim=-1).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, best, True)
    return grouped.masked_fill(~keep[..., None], float("-inf")).view(tokens, experts)


def select_experts(scores: torch.Tensor, bias: Optional[torch.Tensor], top_k: int,
                   n_groups: int, topk_groups: int) -> torch.Tensor:
    """The top_k experts [tokens, top_k] by score plus selection bias, within the best groups."""
    choice = scores if bias is None else scores + bias
    if topk_groups < n_groups:
        choice = limit_to_groups(choice, n_groups, topk_groups)
    return choice.topk(top_k, dim=-1).indices


def expert_weights(scores: torch.Tensor, chosen: torch.Tensor, router: str, normalize: bool,
                   scaling: float) -> torch.Tensor:
    """The chosen experts' unbiased scores, renormalized to sum to one if asked, times `scaling`."""
    weights = scores.gather(1, chosen)
    if normalize:
        # DeepSeek-V3 guards the sigmoid scores' sum; a softmax sum is never zero.
        total = weights.sum(dim=-1, keepdim=True)
        weights = weights / (total + 1e-20 if router == "sigmoid" else total)
    return weights * scaling if scaling != 1.0 else weights


# ------------------------------------------------------------------------ capacity


def expert_capacity(capacity: Optional[int], factor: Optional[float], group_len: int, top_k: int,
                    num_experts: int) -> Optional[int]:
    """Routing slots each expert takes per sequence; None: no limit."""
    if capacity is not None:
        return capacity
    if factor is not None:
        return math.ceil(factor * group_len * top_k / num_experts)
    return None


def kept_slots(chosen: torch.Tensor, num_experts: int, group_len: int, capacity: int) -> torch.Tensor:
    """Which routing slots [tokens, top_k] fit their expert's capacity. Tokens are
    taken in order within each sequence of `group_len` tokens, first choices of all
    tokens before second choices (Switch, GShard); positions come from a cumsum over
    a one-hot, so shapes stay static."""
    top_k = chosen.shape[-1]
    one_hot = F.one_hot(chosen, num_experts)  # [tokens, k, experts]
    by_rank = one_hot.view(-1, group_len, top_k, num_experts).transpose(1, 2)  # [groups, k, seq, experts]
    order = by_rank.reshape(by_rank.shape[0], top_k * group_len, num_experts)
    position = (order.cumsum(dim=1) * order).sum(dim=-1)  # 1-based place in its expert's queue
    position = position.view(-1, top_k, group_len).transpose(1, 2).reshape(-1, top_k)
    return position <= capacity


# ------------------------------------------------------------------------ dispatch


class Dispatch(NamedTuple):
    """Routing slots (token, choice), flattened token-major, as rows sorted by expert."""

    token: torch.Tensor  # [slots] the token each row reads
    inverse: torch.Tensor  # [slots] the row that holds each slot
    offsets: torch.Tensor  # [experts] int32, each expert's end row; rows past the last are dropped slots
    expert: torch.Tensor  # [slots] each row's expert (num_experts for a dropped slot's row)


def dispatch(chosen: torch.Tensor, num_experts: int, keep: Optional[torch.Tensor] = None) -> Dispatch:
    """Sort the slots of `chosen` [tokens, top_k] by expert (stable: token order
    within an expert); slots not kept sort last, in no expert's group."""
    expert = chosen.reshape(-1)
    if keep is not None:
        expert = torch.where(keep.reshape(-1), expert, num_experts)
    order = torch.argsort(expert, stable=True)
    counts = torch.zeros(num_experts + 1, dtype=expert.dtype, device=expert.device)
    counts = counts.scatter_add(0, expert, torch.ones_like(expert))
    slots = torch.arange(expert.numel(), device=expert.device)
    inverse = torch.empty_like(order).scatter(0, order, slots)
    offsets = counts[:num_experts].cumsum(0).to(torch.int32)
    return Dispatch(order // chosen.shape[-1], inverse, offsets, expert[order])


def expert_rows(bias: torch.Tensor, expert: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Each row's bias [slots, n] from the experts' biases [experts, n]; a row in no expert gets zeros."""
    return F.pad(bias.to(dtype), (0, 0, 0, 1))[expert]


# -------------------------------------------------------------------------- losses


def load_balancing_loss(probs: torch.Tensor, chosen: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch-Transformer balance loss as Mixtral computes it: num_experts times the
    sum over experts of (share of routing slots sent there) x (mean router probability)."""
    slots = F.one_hot(chosen, num_experts).float().mean(dim=0)  # [top_k, experts]
    return num_experts * (slots * probs.mean(dim=0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE: the mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits, dim=-1).square().mean()


# -------------------------------------------------------------------------- module


@register("ffn", "moe", params=MoEParams)
class MixtureOfExperts(FeedForward, PreciseBuffers):
    """Top-k routed experts, their weights stacked in [experts, in, out] tensors,
    plus optional always-on shared experts. Each expert runs on the tokens routed
    to it only (grouped dispatch, see the module docstring)."""

    mixture_of_experts = True
    precise_buffers = ("score_bias",)  # too coarse in bf16 for balancing's small steps
    summed_across_ranks = ("expert_load",)  # the bias update follows the global batch's load

    def __init__(self, params: MoEParams, ctx, layer_idx: int = 0):
        super().__init__()
        d, f, e = ctx.model.d_model, params.hidden, params.num_experts
        self.num_experts, self.top_k = e, params.top_k
        self.normalize_top_k, self.aux_loss_coef = params.normalize_top_k, params.aux_loss_coef
        self.router_kind, self.routed_scaling = params.router, params.routed_scaling
        self.n_groups, self.topk_groups = params.n_groups, params.topk_groups
        self.bias_update_rate, self.z_loss_coef = params.bias_update_rate, params.z_loss_coef
        self.capacity, self.capacity_factor, self.dropped = params.capacity, params.capacity_factor, params.dropped
        self.activation = ctx.activation
        std = ctx.model.init_std
        self.router = nn.Linear(d, e, bias=params.router_bias)
        width = f * (2 if self.activation.gated else 1)
        self.w_in = nn.Parameter(nn.init.normal_(torch.empty(e, d, width), std=std))
        self.w_out = nn.Parameter(nn.init.normal_(torch.empty(e, f, d), std=std))
        # Expert biases as the weights are stacked: [experts, gate | up] and [experts, d_model]. Named
        # *bias, so that the optimizer, which decays matrices, leaves these 2-D vectors alone.
        self.in_bias = nn.Parameter(torch.zeros(e, width)) if params.expert_bias else None
        self.out_bias = nn.Parameter(torch.zeros(e, d)) if params.expert_bias else None
        nn.init.normal_(self.router.weight, std=std)
        if self.router.bias is not None:
            nn.init.zeros_(self.router.bias)
        self._init_balancing(params)
        self._init_shared(params, ctx)

    def _init_balancing(self, params: MoEParams) -> None:
        """The selection bias (DeepSeek-V3's e_score_correction_bias), kept in float32
        whatever the model is cast to, and the token counts it is updated from."""
        uses_bias = params.router == "sigmoid" or params.bias_update_rate > 0
        self.register_buffer("score_bias", torch.zeros(self.num_experts) if uses_bias else None)
        counts = torch.zeros(self.num_experts, dtype=torch.long) if params.bias_update_rate > 0 else None
        self.register_buffer("expert_load", counts, persistent=False)

    def _init_shared(self, params: MoEParams, ctx) -> None:
        """The shared experts as one dense FFN of their summed width (as DeepSeek and Qwen store them)."""
        self.shared = self.shared_gate = None
        if params.shared_experts:
            self.shared = DenseFFN(DenseParams(hidden=params.shared_experts * params.hidden, bias=False), ctx)
        if params.shared_gate:
            self.shared_gate = nn.Linear(ctx.model.d_model, 1, bias=False)
            nn.init.normal_(self.shared_gate.weight, std=ctx.model.init_std)

    def route(self, x: torch.Tensor) -> Routing:
        """Router logits and scores [tokens, experts], chosen experts and their weights [tokens, top_k]."""
        logits = self.router(x).float()
        scores = router_scores(logits, self.router_kind)
        chosen = select_experts(scores, self.score_bias, self.top_k, self.n_groups, self.topk_groups)
        weights = expert_weights(scores, chosen, self.router_kind, self.normalize_top_k, self.routed_scaling)
        return Routing(logits, scores, chosen, weights)

    def slot_capacity(self, group_len: int) -> Optional[int]:
        return expert_capacity(self.capacity, self.capacity_factor, group_len, self.top_k, self.num_experts)

    def forward(self, x: torch.Tensor) -> FeedForwardOutput:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        r = self.route(x)
        keep, weights, dropped = self._apply_capacity(r, group_len=shape[-2] if len(shape) > 2 else x.shape[0])
        y = self._routed_output(x, r.chosen, weights, keep)
        if dropped is not None:  # a dropped slot passes its input through, times its weight
            y = y + dropped.sum(dim=-1, keepdim=True).to(x.dtype) * x
        if self.shared is not None:
            y = y + self._shared_output(x)
        if self.training and self.expert_load is not None:
            self.expert_load.add_(F.one_hot(r.chosen, self.num_experts).sum(dim=(0, 1)))
        return FeedForwardOutput(y.reshape(shape), self._aux_loss(r))

    def _routed_output(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor,
                       keep: Optional[torch.Tensor]) -> torch.Tensor:
        """sum over a token's kept slots of weight x expert(token), each expert run on its rows only."""
        plan = dispatch(chosen, self.num_experts, keep)
        rows = x[plan.token]
        in_group = None
        if keep is not None:  # rows of dropped slots belong to no group; bf16's kernel leaves them undefined
            in_group = (torch.arange(rows.shape[0], device=x.device) < plan.offsets[-1]).unsqueeze(-1)
            rows = torch.where(in_group, rows, torch.zeros_like(rows))
        h = grouped_mm(rows, self.w_in, plan.offsets)
        if self.in_bias is not None:
            h = h + expert_rows(self.in_bias, plan.expert, h.dtype)
        out = grouped_mm(gated_product(self.activation, h), self.w_out, plan.offsets)
        if self.out_bias is not None:
            out = out + expert_rows(self.out_bias, plan.expert, out.dtype)
        if in_group is not None:
            out = torch.where(in_group, out, torch.zeros_like(out))
        slots = out[plan.inverse].view(*chosen.shape, -1)  # [tokens, top_k, d]
        return (slots * weights.to(x.dtype).unsqueeze(-1)).sum(dim=1)

    def _apply_capacity(self, r: Routing, group_len: int
                        ) -> tuple[Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
        """Which slots fit their expert's capacity (None: all), the weights of the
        slots kept, and with dropped=identity those of the slots dropped."""
        capacity = self.slot_capacity(group_len)
        if capacity is None:
            return None, r.weights, None
        keep = kept_slots(r.chosen, self.num_experts, group_len, capacity)
        kept = torch.where(keep, r.weights, torch.zeros_like(r.weights))
        return keep, kept, (r.weights - kept if self.dropped == "identity" else None)

    def _shared_output(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shared(x).output
        return out if self.shared_gate is None else torch.sigmoid(self.shared_gate(x)) * out

    def _aux_loss(self, r: Routing) -> torch.Tensor:
        """The balance loss (on sigmoid scores normalized per token, as DeepSeek-V3's)
        plus the router z-loss."""
        probs = r.scores if self.router_kind == "softmax" else r.scores / r.scores.sum(dim=-1, keepdim=True)
        aux = self.aux_loss_coef * load_balancing_loss(probs, r.chosen, self.num_experts)
        if self.z_loss_coef:
            aux = aux + self.z_loss_coef * router_z_loss(r.logits)
        return aux

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Auxiliary-loss-free balancing (DeepSeek-V3): raise the selection bias of
        experts that took fewer routing slots than the mean since the last call,
        lower it for those that took more, by bias_update_rate; then reset the counts."""
        if self.expert_load is None:
            return
        load = self.expert_load.to(self.score_bias.dtype)
        self.score_bias.add_(self.bias_update_rate * torch.sign(load.mean() - load))
        self.expert_load.zero_()

    def active_params(self) -> int:
        """Parameters one token uses: the router, top_k experts (their biases included) and the shared experts."""
        biases = (self.in_bias, self.out_bias)
        expert_biases = sum(b.numel() for b in biases if b is not None) // self.num_experts
        router_bias = 0 if self.router.bias is None else self.router.bias.numel()
        return self.active_matmul_params() + self.top_k * expert_biases + router_bias

    def active_matmul_params(self) -> int:
        """Of those, the weight-matrix elements (the card's FLOPs): the router's weight, top_k experts'
        matrices and the shared experts (their dense FFN and gate have no biases)."""
        per_expert = (self.w_in.numel() + self.w_out.numel()) // self.num_experts
        always = [m for m in (self.shared, self.shared_gate) if m is not None]
        shared = sum(p.numel() for m in always for p in m.parameters())
        return self.router.weight.numel() + self.top_k * per_expert + shared
