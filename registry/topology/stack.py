"""The pieces every topology is wired from: embeddings, blocks, stacks and heads.

Topologies differ in which stacks they have, whether those are causal, and
what the head does; these shared parts carry the options any of them can use
(norm placement, parallel residual, GLM's residual, ALBERT's factorized
embeddings and shared layers, Gemma's scaled embeddings, tied or normalized heads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from omegaconf import SI
from torch import nn

from llmarch_compose import Attention, ConfigError, PositionEncoding, PositionInputs, Topology
from llmarch_compose.model.cache import DecodeInputs, DecodeState, step_positions
from llmarch_compose.plugin.interfaces import LayerStack
from llmarch_compose.model.masks import BlockMasks, flex_runs

NORM_POSITIONS = ("pre", "post", "sandwich", "post_output")
RESIDUALS = ("standard", "glm")
HEAD_BIASES = ("none", "param", "buffer")


@dataclass
class TopologyParams:
    """Options shared by every topology (so a preset's choices survive a change of topology)."""

    # pre: x + f(norm(x)) (GPT-2, LLaMA, T5); post: norm(x + f(x)) (BERT, BART);
    # sandwich: x + norm2(f(norm1(x))), a norm before and after each sublayer (Gemma-2);
    # post_output: x + norm(f(x)), the sublayer's output normalized before it joins the stream (OLMo-2)
    norm_position: str = "pre"
    parallel_residual: bool = False  # x + attn(norm1(x)) + ffn(norm2(x)) (GPT-NeoX, Falcon-40B)
    # with parallel_residual, one norm feeds both branches: x + attn(norm(x)) + ffn(norm(x))
    # (GPT-J, Falcon-7B, Phi-1.5/2, Cohere, StableLM-2)
    shared_norm: bool = False
    residual: str = "standard"  # glm: h = norm(x); x' = h * sqrt(2 * n_layers) + f(h) (ChatGLM-6B)
    share_layers: bool = False  # one block's weights for every layer (ALBERT)
    embedding_norm: bool = False  # a norm right after the embeddings (BERT, BART)
    scale_embeddings: bool = False  # token embeddings * sqrt(d_model), the factor in their dtype (Gemma)
    tie_embeddings: bool = SI("${model.tie_embeddings}")
    mlm_transform: bool = False  # dense + activation + norm before the head (BERT's MLM head)
    mlm_transform_bias: bool = True  # the transform's dense has a bias (ModernBERT's has none)
    # The first layer normalizes its attention input; false: it reads the embeddings as they are
    # (ModernBERT, whose embeddings are already normalized). Pre-norm only.
    first_attn_norm: bool = True
    head_bias: str = "none"  # none | param (BERT's decoder bias) | buffer (BART's final_logits_bias)
    scale_tied_head: bool = False  # hidden * d_model**-0.5 before a tied head (T5 v1.0)
    normalize_head: bool = False  # unit-norm rows of the LM head (Baichuan-2's NormHead)
    final_logit_softcap: Optional[float] = None  # cap * tanh(logits / cap) on the LM head's output (Gemma-2)
    # Granite's multipliers (None: none): token embeddings * embedding_multiplier; each sublayer's
    # output * residual_multiplier as it joins the stream; the LM head's logits / logit_divisor
    embedding_multiplier: Optional[float] = None
    residual_multiplier: Optional[float] = None
    logit_divisor: Optional[float] = None
    # Cohere's logit_scale multiplies where Granite's logits_scaling divides: each family's own
    # arithmetic, so logits match theirs to the bit and config.json round-trips its number exactly
    logit_scale: Optional[float] = None  # logits * scale on the LM head's output, before any cap (Cohere)

    def validate(self, model, key):
        for name, value, choices in (("norm_position", self.norm_position, NORM_POSITIONS),
                                     ("residual", self.residual, RESIDUALS),
                                     ("head_bias", self.head_bias, HEAD_BIASES)):
            if value not in choices:
                raise ConfigError(f"{key}.{name}", value, f"unknown {name.replace('_', ' ')}", choices)
        if self.parallel_residual and (self.norm_position != "pre" or self.residual != "standard"):
            raise ConfigError(f"{key}.parallel_residual", True, "a parallel residual needs standard pre-norm",
                              f"false, or {key}.norm_position=pre and {key}.residual=standard")
        if self.shared_norm and not self.parallel_residual:
            raise ConfigError(f"{key}.shared_norm", True, "one norm shared by attention and the FFN needs a "
                              "parallel residual (a sequential block normalizes the stream between them)",
                              f"false, or {key}.parallel_residual=true")
        if self.residual == "glm" and self.norm_position in ("sandwich", "post_output"):
            raise ConfigError(f"{key}.residual", "glm", "GLM's residual adds the normalized input, which a "
                              f"norm on the sublayer's output ({self.norm_position}) would change",
                              f"standard, or {key}.norm_position=pre or post")
        for name, example in (("embedding_multiplier", "Granite-3: 12.0"), ("residual_multiplier", "Granite-3: 0.22"),
                              ("logit_divisor", "Granite-3: 8.0"), ("logit_scale", "Command-R: 0.0625")):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value != 0):
                raise ConfigError(f"{key}.{name}", value, "must be a finite, nonzero number",
                                  f"a number ({example}), or null for none")
        if not self.mlm_transform_bias and not self.mlm_transform:
            raise ConfigError(f"{key}.mlm_transform_bias", False, "there is no MLM transform to leave unbiased",
                              f"true, or {key}.mlm_transform=true")
        if not self.first_attn_norm and (self.norm_position != "pre" or self.residual != "standard"):
            raise ConfigError(f"{key}.first_attn_norm", False, "only a pre-norm block normalizes the attention "
                              "input alone", f"true, or {key}.norm_position=pre and {key}.residual=standard")
        if not self.first_attn_norm and self.share_layers:
            raise ConfigError(f"{key}.first_attn_norm", False, "one shared block runs every layer, the first "
                              "among them", f"true, or {key}.share_layers=false")
        if self.final_logit_softcap is not None and not self.final_logit_softcap > 0:
            raise ConfigError(f"{key}.final_logit_softcap", self.final_logit_softcap, "must be positive",
                              "a number > 0 (Gemma-2: 30.0), or null for none")
        if self.share_layers and model.layer_pattern:
            raise ConfigError(f"{key}.share_layers", True, "shared layers cannot follow a per-layer pattern",
                              "false, or an empty model.layer_pattern")


def position_inputs(position, positions: torch.Tensor, prefix_len: Optional[torch.Tensor] = None) -> PositionInputs:
    """A stack's per-forward position inputs, carrying the positions they were built for."""
    return position.kernel_inputs(positions, prefix_len)._replace(positions=positions)


class Embeddings(nn.Module):
    """Token embeddings (factorized through model.embedding_dim when set, scaled by
    sqrt(model.d_model) when topology.scale_embeddings), token types when
    model.type_vocab_size > 0, absolute positions, and an optional norm."""

    def __init__(self, params: TopologyParams, ctx, position, tokens: Optional[nn.Embedding] = None):
        super().__init__()
        m = ctx.model
        width = m.embedding_width
        self.tokens = tokens if tokens is not None else nn.Embedding(m.vocab_size, width)
        self.token_types = nn.Embedding(m.type_vocab_size, width) if m.type_vocab_size else None
        self.add_position = position.embed  # a bound method: the topology owns the module
        self.norm = ctx.build("norm", dim=width) if params.embedding_norm else None
        self.project = nn.Linear(width, m.d_model) if width != m.d_model else None
        self.scale = math.sqrt(m.d_model) if params.scale_embeddings else None
        self.multiplier = params.embedding_multiplier
        for table in (None if tokens is not None else self.tokens, self.token_types):
            if table is not None:
                nn.init.normal_(table.weight, std=m.init_std)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.tokens(input_ids)
        if self.scale is not None:  # the factor rounded to the table's dtype first, as Gemma's normalizer is
            x = x * x.new_tensor(self.scale)
        if self.multiplier is not None:  # Granite: a Python number times the table's output
            x = x * self.multiplier
        if self.token_types is not None:
            types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
            x = x + self.token_types(types)
        x = self.add_position(x, positions)
        if self.norm is not None:
            x = self.norm(x)
        return self.project(x) if self.project is not None else x


class BlockCache(NamedTuple):
    """One block's decoding state: its self-attention's buffer and its cross-attention's
    (the source's keys and values, written at the first decoding step)."""

    self_attn: Any
    cross_attn: Any = None


class Block(nn.Module):
    """Self-attention, optional cross-attention, and the FFN, each with its norm and residual."""

    def __init__(self, params: TopologyParams, ctx, layer: int, stack: str, causal: bool, cross: bool, position):
        super().__init__()
        self.pre_norm = params.norm_position in ("pre", "sandwich")
        # post_output: the block's one norm per sublayer normalizes that sublayer's output
        self.output_norm = params.norm_position == "post_output"
        self.parallel = params.parallel_residual
        self.glm_alpha = math.sqrt(2 * ctx.model.n_layers) if params.residual == "glm" else None
        self.residual_multiplier = params.residual_multiplier
        sandwich = params.norm_position == "sandwich"

        def post_norm() -> Optional[nn.Module]:  # a sandwich's norm on a sublayer's output
            return ctx.build("norm", layer=layer, stack=stack) if sandwich else None

        # ModernBERT's first layer: no norm before attention (its input, the embeddings, is normalized).
        skip = layer == 0 and not params.first_attn_norm
        self.attn_norm = nn.Identity() if skip else ctx.build("norm", layer=layer, stack=stack)
        self.attn = ctx.build("attention", layer=layer, stack=stack, causal=causal, position=position)
        self.attn_post_norm = post_norm()
        self.cross_norm = ctx.build("norm", layer=layer, stack=stack) if cross else None
        self.cross_attn = (ctx.build("attention", layer=layer, stack=stack, causal=False, cross=True,
                                     position=position) if cross else None)
        self.cross_post_norm = post_norm() if cross else None
        if self.parallel and cross:
            raise ConfigError("topology.parallel_residual", True, "the parallel block has no place for "
                              "cross-attention", "false with a stack that cross-attends")
        # With a shared norm the FFN reads attn_norm's output: no norm of its own.
        self.ffn_norm = None if params.shared_norm else ctx.build("norm", layer=layer, stack=stack)
        self.ffn = ctx.build("ffn", layer=layer, stack=stack)
        self.ffn_post_norm = post_norm()

    def _input(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """What a sublayer sees: the normalized stream (pre-norm, GLM) or the stream itself."""
        return norm(x) if self.pre_norm or self.glm_alpha else x

    def _residual(self, x: torch.Tensor, h: torch.Tensor, y: torch.Tensor, norm: nn.Module,
                  post: Optional[nn.Module] = None) -> torch.Tensor:
        if post is not None:  # sandwich: the sublayer's output normalized before it joins the stream
            y = post(y)
        if self.output_norm:
            y = norm(y)
        if self.residual_multiplier is not None:  # Granite: the sublayer's share scaled as it joins
            y = y * self.residual_multiplier
        if self.glm_alpha is not None:
            return h * self.glm_alpha + y
        return x + y if self.pre_norm or self.output_norm else norm(x + y)

    def new_cache(self, batch: int, capacity: int, pad: torch.Tensor, device, dtype,
                  source: Optional[tuple[int, torch.Tensor]] = None) -> "BlockCache":
        """This block's decoding state; `source`: (length, padding) of the encoder's output
        that cross-attention reads."""
        cross = None
        if self.cross_attn is not None:
            length, source_pad = source
            cross = self.cross_attn.new_cache(batch, length, source_pad, device, dtype)
        return BlockCache(self.attn.new_cache(batch, capacity, pad, device, dtype), cross)

    def forward(self, x: torch.Tensor, pos: PositionInputs, memory: Optional[torch.Tensor] = None,
                cache: Optional["BlockCache"] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        # A plugin's forward gets `cache` only while decoding (third-party plugins without one keep
        # their two- and three-argument forward).
        def attend(layer, h, memory, buffer):
            if cache is None:
                return layer(h, pos) if memory is None else layer(h, pos, memory)
            return layer(h, pos, memory, cache=buffer)

        if self.parallel:
            h = self.attn_norm(x)
            f = self.ffn(h if self.ffn_norm is None else self.ffn_norm(x))
            y = attend(self.attn, h, None, cache and cache.self_attn) + f.output
            if self.residual_multiplier is not None:
                y = y * self.residual_multiplier
            return x + y, f.aux_loss
        h = self._input(x, self.attn_norm)
        x = self._residual(x, h, attend(self.attn, h, None, cache and cache.self_attn), self.attn_norm,
                           self.attn_post_norm)
        if self.cross_attn is not None:
            h = self._input(x, self.cross_norm)
            x = self._residual(x, h, attend(self.cross_attn, h, memory, cache and cache.cross_attn),
                               self.cross_norm, self.cross_post_norm)
        h = self._input(x, self.ffn_norm)
        f = self.ffn(h)
        return self._residual(x, h, f.output, self.ffn_norm, self.ffn_post_norm), f.aux_loss


class Stack(LayerStack):
    """n_layers blocks and, for pre-norm stacks, a final norm. `blocks` is what the
    compile stage compiles once; with shared layers it holds one block, run n_layers times."""

    def __init__(self, params: TopologyParams, ctx, stack: str, causal: bool, cross: bool, position):
        super().__init__()
        n = ctx.model.n_layers
        self.repeats = n if params.share_layers else 1
        built = range(1 if params.share_layers else n)
        # Layers whose position params a model.layer_pattern rule changed (Gemma-3's global RoPE
        # base) rotate with a module of their own, one per distinct params; the others with `position`.
        self.layer_positions = nn.ModuleList()
        own: dict[int, int] = {}
        self.position_index = []  # per block: 0 for the stack's position, k for layer_positions[k - 1]
        for i in built:
            changed = ctx.spec.layer_params.get((stack, i), {}).get("position")
            if changed is None or changed == ctx.spec.params["position"]:
                self.position_index.append(0)
                continue
            if id(changed) not in own:
                self.layer_positions.append(ctx.build("position", layer=i, stack=stack, causal=causal))
                own[id(changed)] = len(self.layer_positions)
            self.position_index.append(own[id(changed)])
        self.blocks = nn.ModuleList(
            Block(params, ctx, i, stack, causal, cross,
                  self.layer_positions[self.position_index[i] - 1] if self.position_index[i] else position)
            for i in built)
        final = params.norm_position in ("pre", "sandwich", "post_output") or params.residual == "glm"
        self.final_norm = ctx.build("norm") if final else nn.Identity()
        # The distinct masks the layers attend with (a per-layer pattern may give some a window).
        self.mask_specs = tuple(dict.fromkeys(spec for m in self.blocks.modules() if isinstance(m, Attention)
                                              and (spec := m.mask_spec()) is not None))
        self.block_masks = BlockMasks()

    def _blocks_compiled(self) -> bool:
        # Regional compilation wraps each block (nn.Module.compile sets _compiled_call_impl).
        return any(getattr(block, "_compiled_call_impl", None) is not None for block in self.blocks)

    def _needs_grad(self, x: torch.Tensor, pos: PositionInputs) -> bool:
        if not torch.is_grad_enabled():
            return False
        leaves = (x, pos.bias, pos.slopes)
        return any(t is not None and t.requires_grad for t in leaves) or any(
            p.requires_grad for p in self.parameters())

    def with_block_masks(self, x: torch.Tensor, pos: PositionInputs) -> PositionInputs:
        """`pos` with the FlexAttention block masks of this forward, built once for all layers
        (outside the compiled blocks), where FlexAttention runs; unchanged elsewhere."""
        if not self.mask_specs or not flex_runs(x.device, self._needs_grad(x, pos), self._blocks_compiled(),
                                                torch.compiler.is_compiling()):
            return pos
        b, t = x.shape[0], x.shape[1]
        return pos._replace(block_masks=self.block_masks.for_forward(
            self.mask_specs, b, t, t, x.device, pos.prefix_len, pos.slopes, pos.bias))

    @staticmethod
    def _layer_inputs(position: PositionEncoding, x: torch.Tensor, pos: PositionInputs) -> PositionInputs:
        """`pos` with the rotation tables of a layer's own position module (computed once per
        forward for all the layers that share it); masks, biases and decoding state unchanged."""
        positions = pos.positions if pos.positions is not None else torch.arange(x.shape[1], device=x.device)
        return pos._replace(rotary=position.kernel_inputs(positions, pos.prefix_len).rotary)

    def new_caches(self, batch: int, capacity: int, pad: torch.Tensor, device, dtype,
                   source: Optional[tuple[int, torch.Tensor]] = None) -> list[BlockCache]:
        """One decoding state per layer run (a block shared by several layers has one per run)."""
        return [block.new_cache(batch, capacity, pad, device, dtype, source)
                for _ in range(self.repeats) for block in self.blocks]

    def forward(self, x: torch.Tensor, pos: PositionInputs, memory: Optional[torch.Tensor] = None,
                caches: Optional[list[BlockCache]] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if caches is None:
            pos = self.with_block_masks(x, pos)
        aux = None
        run = 0
        per_position = [pos, *(self._layer_inputs(m, x, pos) for m in self.layer_positions)]
        for _ in range(self.repeats):
            for block, k in zip(self.blocks, self.position_index):
                if caches is None:
                    x, block_aux = block(x, per_position[k], memory)
                else:
                    x, block_aux = block(x, per_position[k], memory, caches[run])
                run += 1
                if block_aux is not None:
                    aux = block_aux if aux is None else aux + block_aux
        return self.final_norm(x), aux


class LMHead(nn.Module):
    """Hidden states to vocabulary logits: tied to the token table or its own
    matrix, with BERT's transform, a vocabulary bias, T5's scaling or Baichuan's
    row normalization, a factor on the logits and a tanh cap on them, when asked."""

    def __init__(self, params: TopologyParams, ctx, embeddings: Embeddings):
        super().__init__()
        m = ctx.model
        width = m.embedding_width
        # Kept in a tuple so the table stays the embeddings' submodule alone (one state-dict key).
        self._tied = (embeddings.tokens,) if params.tie_embeddings else ()
        self.transform = None
        if params.mlm_transform:
            self.transform = nn.Sequential(nn.Linear(m.d_model, width, bias=params.mlm_transform_bias),
                                           ctx.activation, ctx.build("norm", dim=width))
            nn.init.normal_(self.transform[0].weight, std=m.init_std)
            if self.transform[0].bias is not None:
                nn.init.zeros_(self.transform[0].bias)
        elif width != m.d_model and params.tie_embeddings:
            raise ConfigError("topology.mlm_transform", False,
                              f"a head tied to {width}-wide factorized embeddings needs a transform to that width",
                              "true")
        self.weight = None if self._tied else nn.Parameter(nn.init.normal_(torch.empty(m.vocab_size, width), std=m.init_std))
        if params.head_bias == "param":
            self.bias = nn.Parameter(torch.zeros(m.vocab_size))
        else:
            self.register_buffer("bias", torch.zeros(m.vocab_size) if params.head_bias == "buffer" else None)
        self.scale = m.d_model ** -0.5 if params.scale_tied_head and params.tie_embeddings else None
        self.normalize = params.normalize_head
        self.softcap = params.final_logit_softcap
        self.divisor = params.logit_divisor
        self.logit_scale = params.logit_scale

    @property
    def tied(self) -> Optional[nn.Embedding]:
        """The token table this head reuses, or None for a head of its own."""
        return self._tied[0] if self._tied else None

    #: Set while a training step computes the loss chunk by chunk (train/chunked_loss.py):
    #: the head then returns its input, and the loss calls `project` on chunks of it.
    defer = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.defer else self.project(x)

    def parameters_of_projection(self) -> list[nn.Parameter]:
        """Every parameter `project` reads: its own, and the token table it is tied to."""
        return [*self.parameters(), *([self.tied.weight] if self.tied is not None else [])]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden states to logits."""
        if self.transform is not None:
            x = self.transform(x)
        if self.scale is not None:
            x = x * self.scale
        weight = self.tied.weight if self.tied is not None else self.weight
        if self.normalize:
            weight = F.normalize(weight, dim=-1)
        logits = F.linear(x, weight, self.bias)
        if self.divisor is not None:  # Granite's logits_scaling
            logits = logits / self.divisor
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.softcap is not None:  # as transformers' Gemma-2 caps: divide, tanh, multiply
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def cached_bias_of(position: PositionEncoding, inputs: PositionInputs):
    """The position plugin's score bias between steps, or None where it has none; a plugin
    that biases scores without a `cached_bias` is refused (it would decode unbiased)."""
    own = type(position).cached_bias is not PositionEncoding.cached_bias
    if (inputs.bias is not None or inputs.slopes is not None) and not own:
        raise ConfigError("position", getattr(position, "plugin_name", type(position).__name__),
                          "biases attention scores but has no cached_bias, so it cannot decode",
                          "a position plugin that implements PositionEncoding.cached_bias")
    return position.cached_bias if own else None


class HeadedTopology(Topology):
    """A topology whose logits come from an `LMHead` (every built-in one)."""

    head: LMHead

    def tied_embedding(self) -> Optional[nn.Embedding]:
        return self.head.tied

    def _like(self, device, dtype):
        p = next(self.parameters())
        return device if device is not None else p.device, dtype if dtype is not None else p.dtype

    def _run_cached(self, stack: Stack, embed: Embeddings, position: PositionEncoding, input_ids: torch.Tensor,
                    state: DecodeState, memory: Optional[torch.Tensor] = None,
                    token_type_ids: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """`stack` over the new tokens `input_ids` of `state`'s batch, reading and writing its buffers."""
        steps = state.step + torch.arange(input_ids.shape[-1], device=input_ids.device)
        positions = step_positions(steps, state.pad)
        x = embed(input_ids, positions, token_type_ids)
        inputs = position.kernel_inputs(positions, state.prefix_len)
        decoding = DecodeInputs(steps, state.pad, state.prefix_len, cached_bias_of(position, inputs))
        pos = inputs._replace(bias=None, slopes=None, positions=positions, decoding=decoding)
        out = stack(x, pos, memory, state.caches[self._stack_name(stack)])
        state.step.add_(input_ids.shape[-1])
        return out

    def _stack_name(self, stack: Stack) -> str:
        return next(name for name, module in self.named_children() if module is stack)

    def _logits(self, x: torch.Tensor, all_logits: bool) -> torch.Tensor:
        return self.head(x if all_logits else x[:, -1:])
