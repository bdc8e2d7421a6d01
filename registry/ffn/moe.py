from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import SI
from torch import nn

from llmarch_compose import ConfigError, FeedForward, FeedForwardOutput, register

from .dense import gated_product


@dataclass
class MoEParams:
    num_experts: int = SI("${model.n_experts}")
    top_k: int = SI("${model.experts_per_token}")
    hidden: int = SI("${model.ffn_dim}")  # each expert's hidden width
    normalize_top_k: bool = True  # renormalize the chosen experts' weights to sum to one (Mixtral)
    aux_loss_coef: float = SI("${model.router_aux_loss_coef}")

    def validate(self, model, key):
        if self.num_experts < 1:
            raise ConfigError(f"{key}.num_experts", self.num_experts, "must be positive", "an integer >= 1")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"{key}.top_k", self.top_k,
                              f"must lie between 1 and num_experts={self.num_experts}",
                              list(range(1, self.num_experts + 1)))
        if self.hidden < 1:
            raise ConfigError(f"{key}.hidden", self.hidden, "must be positive", "an integer >= 1")
        if self.aux_loss_coef < 0:
            raise ConfigError(f"{key}.aux_loss_coef", self.aux_loss_coef, "must not be negative", "a number >= 0")


def load_balancing_loss(probs: torch.Tensor, chosen: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch-Transformer balance loss as Mixtral computes it: num_experts times the
    sum over experts of (share of routing slots sent there) x (mean router probability)."""
    slots = F.one_hot(chosen, num_experts).float().mean(dim=0)  # [top_k, experts]
    return num_experts * (slots * probs.mean(dim=0)).sum()


@register("ffn", "moe", params=MoEParams)
class MixtureOfExperts(FeedForward):
    """Top-k routed experts, their weights stacked in [experts, in, out] tensors.

    Every token is run through every expert and the outputs are combined with the
    (mostly zero) routing weights: static shapes, so it compiles with fullgraph,
    at num_experts / top_k times the matrix work of a dispatching kernel.
    """

    def __init__(self, params: MoEParams, ctx, layer_idx: int = 0):
        super().__init__()
        d, f, e = ctx.model.d_model, params.hidden, params.num_experts
        self.num_experts, self.top_k = e, params.top_k
        self.normalize_top_k, self.aux_loss_coef = params.normalize_top_k, params.aux_loss_coef
        self.activation = ctx.activation
        self.router = nn.Linear(d, e, bias=False)
        width = f * (2 if self.activation.gated else 1)
        std = ctx.model.init_std
        self.w_in = nn.Parameter(torch.randn(e, d, width) * std)
        self.w_out = nn.Parameter(torch.randn(e, f, d) * std)
        nn.init.normal_(self.router.weight, std=std)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router probabilities [tokens, experts], chosen experts and their weights [tokens, top_k]."""
        probs = torch.softmax(self.router(x).float(), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if self.normalize_top_k:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return probs, chosen, weights

    def forward(self, x: torch.Tensor) -> FeedForwardOutput:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs, chosen, weights = self.route(x)
        combine = torch.zeros_like(probs).scatter(1, chosen, weights).to(x.dtype)  # [tokens, experts]
        h = gated_product(self.activation, torch.einsum("td,edf->etf", x, self.w_in))
        y = torch.einsum("etd,te->td", torch.bmm(h, self.w_out), combine)
        aux = self.aux_loss_coef * load_balancing_loss(probs, chosen, self.num_experts)
        return FeedForwardOutput(y.reshape(shape), aux)

    def active_params(self) -> int:
        """Parameters one token uses: the router and top_k experts."""
        per_expert = (self.w_in.numel() + self.w_out.numel()) // self.num_experts
        return self.router.weight.numel() + self.top_k * per_expert
