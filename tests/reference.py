"""Naive reference implementations of the built-in plugins, for the numerics tests.

Everything here is written the plainest way: textbook formulas, explicit loops
over heads, tokens and experts, Python scalars where a table is built. None of
it calls the plugin code or the fused torch kernels the plugins use
(`F.layer_norm`, `F.gelu`, `F.scaled_dot_product_attention`, ...), so a test
comparing the two compares two independent derivations. The functions take
plain tensors (the module's weights, cloned) so that autograd through them
gives reference gradients too.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

# --------------------------------------------------------------------------- norms


def layernorm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float
              ) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias, var the biased (1/n) variance (no weight: unscaled)."""
    n = x.shape[-1]
    mean = x.sum(dim=-1, keepdim=True) / n
    centred = x - mean
    var = (centred * centred).sum(dim=-1, keepdim=True) / n
    y = centred / torch.sqrt(var + eps)
    y = y if weight is None else y * weight
    return y if bias is None else y + bias


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * (offset + weight)."""
    n = x.shape[-1]
    mean_square = (x * x).sum(dim=-1, keepdim=True) / n
    return x / torch.sqrt(mean_square + eps) * (weight + offset)


# --------------------------------------------------------------------- activations


def relu(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x, torch.zeros_like(x))


def gelu_exact(x: torch.Tensor) -> torch.Tensor:
    """x * Phi(x), Phi the standard normal CDF: 0.5 * (1 + erf(x / sqrt(2)))."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))  (GPT-2's gelu_new)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def silu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x) = x / (1 + exp(-x))."""
    return x / (1.0 + torch.exp(-x))


#: activation plugin name -> (elementwise function, gated?)
ACTIVATIONS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], bool]] = {
    "relu": (relu, False),
    "gelu": (gelu_exact, False),
    "gelu_tanh": (gelu_tanh, False),
    "silu": (silu, False),
    "reglu": (relu, True),
    "geglu": (gelu_exact, True),
    "geglu_tanh": (gelu_tanh, True),
    "swiglu": (silu, True),
}


# ------------------------------------------------------------------------------ FFN


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x W^T + b, as nn.Linear stores W ([out, in])."""
    y = x @ weight.transpose(0, 1)
    return y if bias is None else y + bias


def dense_ffn(x, up_w, up_b, down_w, down_b, act, gated: bool, hidden: int) -> torch.Tensor:
    """Non-gated: act(x Wu) Wd. Gated: (act(x Wg) * (x Wu)) Wd, where the fused `up`
    weight holds the gate rows first, then the up rows."""
    if gated:
        gate_w, value_w = up_w[:hidden], up_w[hidden:]
        gate_b = None if up_b is None else up_b[:hidden]
        value_b = None if up_b is None else up_b[hidden:]
        h = act(linear(x, gate_w, gate_b)) * linear(x, value_w, value_b)
    else:
        h = act(linear(x, up_w, up_b))
    return linear(h, down_w, down_b)


# ------------------------------------------------------------------------ positions


def sinusoidal_table(n_positions: int, d: int, base: float = 10000.0, halves: bool = False) -> torch.Tensor:
    """Vaswani et al.: PE[p, 2i] = sin(p / base^(2i/d)), PE[p, 2i+1] = cos(p / base^(2i/d));
    `halves` (fairseq, Marian): PE[p, i] = sin(...), PE[p, d/2 + i] = cos(...)."""
    table = [[0.0] * d for _ in range(n_positions)]
    for p in range(n_positions):
        for i in range(d // 2):
            angle = p / base ** (2 * i / d)
            table[p][i if halves else 2 * i] = math.sin(angle)
            table[p][d // 2 + i if halves else 2 * i + 1] = math.cos(angle)
    return torch.tensor(table, dtype=torch.float64)


def rope_inv_freq(theta: float, rotary_dim: int) -> torch.Tensor:
    """theta^(-2i/rotary_dim) for i = 0 .. rotary_dim/2 - 1, one Python float at a time."""
    return torch.tensor([theta ** (-2 * i / rotary_dim) for i in range(rotary_dim // 2)], dtype=torch.float64)


def rope_rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, rotary_dim: int,
                interleaved: bool, attention_factor: float = 1.0) -> torch.Tensor:
    """Rotate the first `rotary_dim` dimensions of x [..., seq, head_dim] by complex
    multiplication: pair i (dims (i, i + rotary_dim/2), or (2i, 2i+1) when interleaved)
    is the complex number a + ib, multiplied by attention_factor * exp(i * pos * inv_freq[i]).
    positions: [seq] or [batch, seq] (then x is [batch, heads, seq, head_dim])."""
    half = rotary_dim // 2
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        real, imag = rot[..., 0::2], rot[..., 1::2]
    else:
        real, imag = rot[..., :half], rot[..., half:]
    z = torch.complex(real.contiguous(), imag.contiguous())
    angles = positions.to(torch.float64)[..., None] * inv_freq.to(torch.float64)  # [(batch,) seq, half]
    if angles.dim() == 3:
        angles = angles[:, None]  # broadcast over heads
    phase = torch.polar(torch.full_like(angles, attention_factor), angles).to(z.dtype)
    w = z * phase
    if interleaved:
        out = torch.stack((w.real, w.imag), dim=-1).flatten(-2)
    else:
        out = torch.cat((w.real, w.imag), dim=-1)
    out = out.to(x.dtype)
    return torch.cat((out, rest), dim=-1)


# ------------------------------------------------------------------------ attention


def attention_allowed(t: int, causal: bool, window: Optional[int]) -> list[list[bool]]:
    """allowed[i][j]: may query i see key j. Causal: j <= i (and i - j < window);
    bidirectional with a window: |i - j| < window."""
    table = []
    for i in range(t):
        row = []
        for j in range(t):
            ok = True
            if causal and j > i:
                ok = False
            if window is not None and abs(i - j) >= window:
                ok = False
            row.append(ok)
        table.append(row)
    return table


def softmax_rows(scores: torch.Tensor, allowed: list[list[bool]]) -> torch.Tensor:
    """Row-wise softmax over the allowed entries only (the others get exactly 0)."""
    rows = []
    for i, row_ok in enumerate(allowed):
        keep = torch.tensor(row_ok)
        s = scores[i]
        m = max(s[j].item() for j in range(len(row_ok)) if row_ok[j])
        # Masked entries become exp(-inf) = 0 (masking before exp keeps their gradient 0, never NaN).
        e = torch.exp(torch.where(keep, s - m, torch.full_like(s, float("-inf"))))
        rows.append(e / e.sum())
    return torch.stack(rows)


def attention(x, qkv_w, qkv_b, out_w, out_b, n_heads: int, n_kv_heads: int, head_dim: int,
              causal: bool, window: Optional[int], rotate=None, scale: Optional[float] = None,
              score_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Multi-head attention, one batch element and one query head at a time.

    x: [batch, seq, d]. The fused qkv weight holds the q rows (n_heads * head_dim),
    then k, then v (n_kv_heads * head_dim each). Query head h reads KV head
    h // (n_heads // n_kv_heads). `rotate(t)` rotates a [seq, head_dim] tensor.
    `score_bias` [n_heads, seq, seq] is added to head h's scaled scores before masking.
    """
    b, t, _ = x.shape
    q_size, kv_size = n_heads * head_dim, n_kv_heads * head_dim
    group = n_heads // n_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    allowed = attention_allowed(t, causal, window)
    outputs = []
    for bi in range(b):
        xb = x[bi]
        q_all = linear(xb, qkv_w[:q_size], None if qkv_b is None else qkv_b[:q_size])
        k_rows = slice(q_size, q_size + kv_size)
        k_all = linear(xb, qkv_w[k_rows], None if qkv_b is None else qkv_b[k_rows])
        v_all = linear(xb, qkv_w[q_size + kv_size:], None if qkv_b is None else qkv_b[q_size + kv_size:])
        heads = []
        for h in range(n_heads):
            g = h // group
            q = q_all[:, h * head_dim:(h + 1) * head_dim]
            k = k_all[:, g * head_dim:(g + 1) * head_dim]
            v = v_all[:, g * head_dim:(g + 1) * head_dim]
            if rotate is not None:
                q, k = rotate(q), rotate(k)
            scores = q @ k.transpose(0, 1) * scale
            if score_bias is not None:
                scores = scores + score_bias[h]
            probs = softmax_rows(scores, allowed)
            heads.append(probs @ v)
        outputs.append(linear(torch.cat(heads, dim=-1), out_w, out_b))
    return torch.stack(outputs)


# ------------------------------------------------------------------------------ MoE


def moe(x, router_w, w_in, w_out, act, gated: bool, hidden: int, top_k: int, normalize: bool):
    """Token by token: softmax router probabilities, the top_k experts by probability
    (ties broken by the lower index), their weights (renormalized or not), and the
    weighted sum of those experts' FFN outputs. Returns (output [..., d], probs [tokens, E],
    chosen experts per token as a list of lists)."""
    shape = x.shape
    tokens = x.reshape(-1, shape[-1])
    n_experts = w_in.shape[0]
    outs, all_probs, all_chosen = [], [], []
    for t in range(tokens.shape[0]):
        xt = tokens[t]
        logits = [(router_w[e] * xt).sum() for e in range(n_experts)]
        m = max(float(v.detach()) for v in logits)
        exps = [torch.exp(v - m) for v in logits]
        total = sum(exps)
        probs = [e_ / total for e_ in exps]
        order = sorted(range(n_experts), key=lambda e: (-float(probs[e].detach()), e))
        chosen = order[:top_k]
        weights = [probs[e] for e in chosen]
        if normalize:
            s = sum(weights)
            weights = [w / s for w in weights]
        y = torch.zeros_like(xt)
        for e, w in zip(chosen, weights):
            h = xt @ w_in[e]  # [width]
            if gated:
                h = act(h[:hidden]) * h[hidden:]
            else:
                h = act(h)
            y = y + w * (h @ w_out[e])
        outs.append(y)
        all_probs.append(torch.stack(probs))
        all_chosen.append(chosen)
    return torch.stack(outs).reshape(shape), torch.stack(all_probs), all_chosen


def switch_balance_loss(probs: torch.Tensor, chosen: list[list[int]], n_experts: int) -> torch.Tensor:
    """Switch Transformer / Mixtral: E * sum_e f_e * P_e, f_e the share of tokens that
    picked expert e (counting each of the top_k picks), P_e its mean router probability."""
    n_tokens = len(chosen)
    loss = probs.new_zeros(())
    for e in range(n_experts):
        f = sum(1 for c in chosen if e in c) / n_tokens
        p = sum(probs[t, e] for t in range(n_tokens)) / n_tokens
        loss = loss + f * p
    return n_experts * loss
