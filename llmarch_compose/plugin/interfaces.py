"""The interfaces that plugins of each group implement.

Each base class names the hooks the builder and the topologies call; a plugin
overrides the ones it needs. Every plugin class is constructed as
`cls(params, ctx, **kwargs)` with its params dataclass and the build context.
The core calls no hook that is not declared here (or on `ComponentParams`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Optional

import torch
from torch import nn

from .objectives import CAUSAL_LM, Objective


class ComponentParams:
    """What the core may call on every component's params, whatever dataclass the plugin
    declares: the registry derives each params class's config node from this class, so a
    plain dataclass with a `validate` method of its own overrides the default."""

    def validate(self, model: Any, key: str) -> None:
        """Refuse bad values before anything is built: `model` holds the validated `model.`
        numbers (`head_dim` filled in), `key` is where the node sits (`attention`, or
        `model.layer_pattern[1].attention`); raise `ConfigError(key + ".field", ...)`.
        Nothing to check by default."""


class Labelled:
    """The hook through which `task=table` names a component: every component interface has it."""

    #: The label when it does not depend on the params; None: the registered plugin name.
    table_name: ClassVar[Optional[str]] = None

    @classmethod
    def table_label(cls, params: Any, model: Any) -> str:
        """This choice's cell in `task=table` (`model`: the validated `model.` numbers)."""
        return cls.table_name if cls.table_name is not None else params.plugin


def table_label(cls: type, params: Any, model: Any) -> str:
    """`cls.table_label`, or the plugin name for a module that does not derive from an
    interface (a norm may be a plain `nn.Module`)."""
    return cls.table_label(params, model) if issubclass(cls, Labelled) else params.plugin


class PositionInputs(NamedTuple):
    """What a position encoding hands every attention layer, computed once per forward."""

    rotary: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # cos, sin: [(batch,) seq, rotary_dim]
    bias: Optional[torch.Tensor] = None  # additive score bias: [heads, q_len, k_len] or [batch, heads, ...]
    prefix_len: Optional[torch.Tensor] = None  # [batch] tokens of the bidirectional prefix (prefix-LM)
    positions: Optional[torch.Tensor] = None  # the positions these were built for (set by the topology)
    slopes: Optional[torch.Tensor] = None  # [heads]: score - slopes[h] * |q - k| (ALiBi, computed in the kernel)
    # (MaskSpec, BlockMask) pairs the stack built this forward for FlexAttention (llmarch_compose/model/masks.py);
    # a layer whose spec is missing runs SDPA with a dense mask.
    block_masks: tuple = ()
    # Set while decoding (llmarch_compose/model/cache.py): the steps of the new tokens, each row's
    # padding, the prefix and the score bias between steps. Layers then read and write their buffers.
    decoding: Any = None


class PreciseBuffers(nn.Module):
    """A module whose floating-point buffers never lose precision when the model is
    cast (`model.to(torch.bfloat16)`): RoPE's frequencies (in bf16 an angle p * f
    drifts by ~p/256), a router's selection bias (too coarse for small steps).
    `precise_buffers` names them; None means all of the module's own float buffers."""

    precise_buffers: Optional[tuple[str, ...]] = None

    def _apply(self, fn, recurse=True):
        names = self.precise_buffers if self.precise_buffers is not None else tuple(self._buffers)
        kept = {n: b for n in names if (b := self._buffers.get(n)) is not None and b.is_floating_point()}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = self._buffers[name]
            if after is not None and torch.finfo(after.dtype).eps > torch.finfo(before.dtype).eps:
                self._buffers[name] = before.to(after.device)
        return self


class PositionEncoding(PreciseBuffers, Labelled):
    """Position information, through any of three hooks (one plugin may use several).

    - `embed`: add to the token embeddings (learned, sinusoidal);
    - `attention_inputs` + `rotate`: transform queries and keys (RoPE and its scalings);
    - `attention_inputs(...).bias`: an additive score bias (T5 buckets, ALiBi).

    Constructed as `cls(params, ctx, causal=True)`: `causal` says whether the
    stack it serves is causal (T5's buckets differ for encoder and decoder). The
    topology owns one instance per stack and calls `attention_inputs` once per
    forward, so tables and biases are built once, not once per layer.

    `max_positions`: the most positions the encoding can place (a learned table's rows);
    None: any number (what `task=eval` reads before evaluating past the training length).
    """

    max_positions: Optional[int] = None

    def embed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return x

    def attention_inputs(self, positions: torch.Tensor, prefix_len: Optional[torch.Tensor] = None) -> PositionInputs:
        return PositionInputs(prefix_len=prefix_len)

    def kernel_inputs(self, positions: torch.Tensor, prefix_len: Optional[torch.Tensor] = None) -> PositionInputs:
        """What the model's own attention layers get: `attention_inputs`, unless the plugin can
        hand its score bias over as a function the attention kernel computes (ALiBi's slopes)
        instead of a dense table."""
        return self.attention_inputs(positions, prefix_len)

    def rotate(self, q: torch.Tensor, k: torch.Tensor, inputs: PositionInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [batch, heads, seq, head_dim], k: [batch, kv_heads, seq, head_dim]."""
        return q, k

    def cached_bias(self, query_steps: torch.Tensor, key_steps: torch.Tensor) -> Optional[torch.Tensor]:
        """While decoding: the additive score bias [heads, t, s] between queries and cached keys at
        these steps (a row's padding shifts both alike, so only differences count). A plugin whose
        `attention_inputs` hands out a bias or slopes must implement it; None: no bias."""
        return None


class Norm(nn.Module, Labelled):
    """A normalization over the last dimension: `x -> same shape`. Constructed as
    `cls(params, ctx, dim=None)` (None: `d_model`)."""


class Activation(nn.Module, Labelled):
    """An elementwise function. `gated` ones (the GLU family) make the FFN compute
    `combine(x W_gate, x W_up)`, by default `act(x W_gate) * (x W_up)`, doubling its up-projection."""

    gated: bool = False

    def combine(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """A gated FFN's hidden state from its two halves (every FFN and expert calls this):
        act(gate) * up, unless the plugin joins them otherwise (gpt-oss clamps both, adds one to up)."""
        return self(gate) * up


class Attention(nn.Module, Labelled):
    """Self-attention over [batch, seq, d_model] inputs.

    Cost hooks let the architecture card count what parameters alone do not show.
    """

    #: Buffers that count something over this rank's batch between optimizer steps, which
    #: a run over several ranks sums before `after_optimizer_step` reads them.
    summed_across_ranks: tuple[str, ...] = ()
    #: What the layer was built as (the constructor's `causal` and `cross`), for descriptions of
    #: the built model (`task=diagram`): a plugin that takes them keeps them here.
    causal: bool = True
    cross: bool = False
    #: Fields of the position plugin's params this attention reads itself (dotted, under
    #: `position.`): a field there that only an attention reads is refused when none chosen does.
    reads_from_position: tuple[str, ...] = ()

    @classmethod
    def key_value_heads(cls, params: Any, model: Any) -> Optional[int]:
        """How many key/value heads the query heads share (the card's `n_kv_heads`; `model.n_heads`
        for MHA, 1 for MQA); None where attention has no such heads (MLA's latent). None by default."""
        return None

    @classmethod
    def table_label(cls, params: Any, model: Any) -> str:
        """`table_name` if set; else MHA, MQA or GQA by `key_value_heads`; else the plugin name."""
        kv = cls.key_value_heads(params, model)
        if cls.table_name is not None or kv is None:
            return super().table_label(params, model)
        return "MHA" if kv == model.n_heads else "MQA" if kv == 1 else "GQA"

    def forward(self, x: torch.Tensor, pos: PositionInputs,
                memory: Optional[torch.Tensor] = None) -> torch.Tensor:  # pragma: no cover
        """`memory`: the encoder's output, for cross-attention in an encoder-decoder (keys and values
        from it, no mask); None for self-attention."""
        raise NotImplementedError

    def after_optimizer_step(self) -> None:
        """Called after every optimizer step; nothing by default."""

    def mask_spec(self):
        """The `llmarch_compose.model.masks.MaskSpec` this layer attends with, so the stack builds its
        FlexAttention block mask once per forward; None (the default) asks for none, and the
        layer masks by itself."""
        return None

    def new_cache(self, batch: int, capacity: int, pad: torch.Tensor, device=None, dtype=None):
        """Allocate this layer's decoding state (a `llmarch_compose.model.cache.KVBuffer`) for `batch`
        rows of up to `capacity` steps, `pad[row]` of them left padding. While decoding, `forward`
        gets `pos.decoding` set and its buffer as `cache`, writes the new tokens' entries into it and
        attends over it. A plugin without one cannot generate: it is refused by name."""
        raise cache_unsupported(self)

    def kv_cache_bytes_per_token(self, dtype_bytes: int) -> int:
        raise NotImplementedError

    def kv_cache_tokens(self, context: int) -> int:
        """How many tokens the cache holds at `context` (a window caps it)."""
        return context

    def score_flops_per_token(self, context: int) -> int:
        """Forward FLOPs per token spent on scores and the weighted sum, averaged
        over the positions of a sequence of length `context`."""
        raise NotImplementedError


def cache_unsupported(layer: nn.Module) -> Exception:
    """The error for an attention plugin that declares no decoding state."""
    from ..errors import ConfigError
    from .registry import entries

    name = getattr(layer, "plugin_name", type(layer).__name__)
    cached = [n for n, e in entries("attention").items() if getattr(e.cls, "new_cache", None) is not Attention.new_cache]
    return ConfigError("attention", name, "has no KV cache (it does not implement Attention.new_cache), so a "
                       "model with it cannot generate", cached)


class FeedForwardOutput(NamedTuple):
    output: torch.Tensor
    aux_loss: Optional[torch.Tensor]  # already weighted; None for dense layers


class FeedForward(nn.Module, Labelled):
    """The position-wise network: dense or a mixture of experts."""

    #: A mixture of experts (the table marks the model MoE).
    mixture_of_experts: bool = False
    #: As Attention.summed_across_ranks: per-rank counters summed over the ranks before
    #: `after_optimizer_step` (an MoE's expert load).
    summed_across_ranks: tuple[str, ...] = ()

    def forward(self, x: torch.Tensor) -> FeedForwardOutput:  # pragma: no cover
        raise NotImplementedError

    def active_params(self) -> Optional[int]:
        """The parameters one token uses, where fewer than all (a mixture of experts: the router,
        the shared and the top-k routed experts); None: every parameter."""
        return None

    def active_matmul_params(self) -> Optional[int]:
        """Of `active_params`, the weight-matrix elements (what the card counts 2 FLOPs each for);
        by default all of them: a plugin whose active parameters include biases says so here."""
        return self.active_params()

    def after_optimizer_step(self) -> None:
        """Called after every optimizer step (auxiliary-loss-free expert balance); nothing by default."""


class ModelOutput(NamedTuple):
    logits: torch.Tensor
    aux_loss: Optional[torch.Tensor]  # the sum of the layers' auxiliary losses, or None


class LayerStack(nn.Module):
    """A stack of repeated blocks. `blocks` is what the compile stage compiles once and
    reuses for every layer; the stack runs them `repeats` times (ALBERT's shared layers:
    one block, run n_layers times), which the card multiplies its figures by."""

    blocks: nn.ModuleList
    repeats: int = 1


class Topology(nn.Module, Labelled):
    """The whole model: embeddings, its stacks of blocks (`LayerStack`), and the head."""

    #: What the model is trained for, and what its forward takes (llmarch_compose/plugin/objectives.py).
    objective: Objective = CAUSAL_LM
    #: The longest input it takes, where it has a bound of its own (export's default for a
    #: dynamic length); None: unbounded.
    max_seq_len: Optional[int] = None
    #: The stacks it builds, by the names `model.layer_pattern` selects with `stack:`.
    stacks: tuple[str, ...] = ("decoder",)

    def forward(self, input_ids: torch.Tensor) -> ModelOutput:  # pragma: no cover
        raise NotImplementedError

    def new_decode_state(self, batch: int, capacity: int, pad: Optional[torch.Tensor] = None, **kwargs):
        """The decoding state (`llmarch_compose.model.cache.DecodeState`) of `batch` rows of up to
        `capacity` steps, `pad[row]` of them left padding: every layer's buffer, allocated now."""
        from ..errors import ConfigError

        raise ConfigError("topology", getattr(self, "plugin_name", type(self).__name__),
                          "does not decode (it implements no Topology.new_decode_state)",
                          "decoder_only, prefix_decoder, encoder_decoder, encoder_only (fill_mask)")

    def decode_step(self, input_ids: torch.Tensor, state: Any, all_logits: bool = False) -> ModelOutput:
        """The logits of the new tokens `input_ids` (the last one's unless `all_logits`), reading and
        writing `state`'s buffers and advancing its step: the inference graph."""
        raise NotImplementedError

    def after_optimizer_step(self) -> None:
        """Run every attention and feed-forward layer's after-step hook (the training loop calls this)."""
        for module in self.modules():
            if isinstance(module, (FeedForward, Attention)):
                module.after_optimizer_step()

    def compile_regions(self) -> list[nn.Module]:
        """The repeated blocks of every stack (a block shared across layers appears once)."""
        regions = {}
        for module in self.modules():
            if isinstance(module, LayerStack):
                regions.update((id(b), b) for b in module.blocks)
        return list(regions.values())

    def tied_embedding(self) -> Optional[nn.Embedding]:
        """The token table the LM head reuses as its weight, if it does (the card counts
        that product once more); None for a head of its own."""
        return None

    def embedding_modules(self) -> list[nn.Module]:
        """The lookup tables added to the input (tokens, token types, absolute
        positions) for the card's split. A position encoding's table that biases
        scores instead (T5's buckets) is not an embedding."""
        biasing = [m for m in self.modules()
                   if isinstance(m, PositionEncoding) and type(m).embed is PositionEncoding.embed]
        inside = {id(t) for m in biasing for t in m.modules()}
        return [m for m in self.modules() if isinstance(m, nn.Embedding) and id(m) not in inside]


class DataSource:
    """Training data (the `data` group): windows of token ids and their targets.

    A data choice is registered with `@register("data", name, params=ItsConfig)` on a class
    or function that takes the typed config and returns a DataSource.
    """

    #: The token ids it uses (the model's vocabulary must hold them).
    vocab_size: int
    #: Whether exact-match accuracy on the targets means something (synthetic tasks).
    has_accuracy: bool = False
    #: The accuracy of guessing, where it is known (reported beside the measured accuracy).
    chance_accuracy: Optional[float] = None
    #: The length it wants when `task.seq_len` is null; None: the model's context.
    natural_seq_len: Optional[int] = None
    #: Whether it only makes sense read left to right (answers after questions).
    causal_only: bool = False

    def check_seq_len(self, seq_len: int) -> None:
        """Refuse, before any training, a length it cannot serve (a ConfigError on task.seq_len)."""

    def batch(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        """(inputs [batch, seq_len], targets: the next tokens, IGNORE where nothing is asked) of `split`."""
        raise NotImplementedError


class ModelSource:
    """Where a model's description and weights come from when `model.path` names a folder
    (a Hugging Face checkpoint, say). The core asks the registered sources (group
    `model_source`); the adapter that provides one sits above the core."""

    def recognizes(self, path: Path) -> bool:  # pragma: no cover
        """Whether the folder `path` is in this source's format."""
        raise NotImplementedError

    def overrides(self, path: Path) -> list[str]:  # pragma: no cover
        """The overrides that compose the model the folder describes (`model.path` included)."""
        raise NotImplementedError

    def load_weights(self, model: nn.Module, spec: Any, path: Path) -> None:  # pragma: no cover
        """Fill every tensor of `model` (built from `spec`) from the folder, or raise naming the tensor."""
        raise NotImplementedError
