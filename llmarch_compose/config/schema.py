"""Typed schema of the composed config's top level and of the `model.` numbers.

A preset (`conf/model/*.yaml`) picks group choices and sets numbers under
`model.`; group nodes read those numbers by interpolation
(`num_kv_heads: ${model.n_kv_heads}`), so a group chosen on the command line
still takes the preset's numbers and nothing a preset wrote can contradict it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import SI


@dataclass
class ModelConfig:
    """Model-level numbers shared by the component groups."""

    name: str = "custom"  # the preset's name, shown on the architecture card
    path: Optional[str] = None  # a Hugging Face checkpoint folder to build from (model=hf)
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 2  # read by attention=gqa
    head_dim: Optional[int] = None  # None: d_model // n_heads
    ffn_dim: int = 704  # hidden width of a dense FFN, or of each expert
    vocab_size: int = 256
    max_seq_len: int = 256
    tie_embeddings: bool = False
    embedding_dim: Optional[int] = None  # factorized token embeddings, projected to d_model (ALBERT)
    type_vocab_size: int = 0  # token-type (segment) embeddings (BERT: 2)
    position_offset: int = 0  # rows of a learned position table before position 0 (BART, RoBERTa: 2)
    norm_eps: float = 1e-5
    attention_bias: bool = False  # bias on the q, k, v and output projections
    qkv_bias: bool = SI("${.attention_bias}")  # Qwen-2 biases q, k, v but not the output
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    rope_scaling: Any = None  # None, or e.g. {type: llama3, factor: 8, original_max_seq_len: 8192}
    rotary_fraction: float = 1.0  # share of each head's dimensions that rotate
    rope_interleaved: bool = False  # rotate adjacent pairs (GPT-J, ChatGLM) instead of the two halves
    window: Optional[int] = None  # read by attention=swa
    attention_scale: Optional[float] = None  # None: 1 / sqrt(head_dim); T5 uses 1.0
    attention_softcap: Optional[float] = None  # read by attention=gqa: cap * tanh(score / cap) (Gemma-2: 50.0)
    qk_norm: bool = False  # normalize queries and keys (the norm group's plugin)
    qk_norm_scope: str = "per_head"  # per_head: over each head (Qwen3); whole: over all heads at once (OLMo-2)
    # Multi-head latent attention (attention=mla, DeepSeek-V2/V3); None: derived from the width.
    q_lora_rank: Optional[int] = None  # None: queries projected directly
    kv_lora_rank: Optional[int] = None
    qk_rope_head_dim: Optional[int] = None
    qk_nope_head_dim: Optional[int] = None
    v_head_dim: Optional[int] = None
    # Mixture of experts (ffn=moe and its variants)
    n_experts: int = 8
    experts_per_token: int = 2
    expert_ffn_dim: int = SI("${.ffn_dim}")  # hidden width of each routed expert
    n_shared_experts: int = 0  # always-on experts (DeepSeek, Qwen-MoE), each expert_ffn_dim wide
    n_expert_groups: int = 1  # group-limited routing (DeepSeek-V3): experts are chosen from
    topk_expert_groups: int = 1  #   the best topk_expert_groups of n_expert_groups groups
    routed_scaling_factor: float = 1.0
    expert_capacity_factor: Optional[float] = None  # None (and no expert_capacity): dropless
    expert_capacity: Optional[int] = None  # routing slots per expert and sequence (Switch's expert_capacity)
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0
    # Per-layer rules for hybrids, applied in order; see llmarch_compose/config/layer_patterns.py.
    layer_pattern: List[Any] = field(default_factory=list)
    init_std: float = 0.02
    # Special token ids, as a Hugging Face checkpoint states them (generation reads them).
    bos_token_id: Optional[int] = None
    eos_token_id: Any = None  # an id, or a list of ids (GLM-4 stops at any of three)
    pad_token_id: Optional[int] = None
    decoder_start_token_id: Optional[int] = None  # where an encoder-decoder's decoding starts (T5: 0, BART: 2)
    # Equal budgets (config/match.py): one dimension moved until a card figure meets a target.
    match: Optional[str] = None  # params | active_params | flops_per_token | kv_cache_bytes; None: off
    match_target: Any = None  # a number, a preset name (its figure at this scale) or baseline (a sweep's first job)
    match_by: str = "ffn_dim"  # the dimension that moves: ffn_dim | d_model | n_layers | n_experts
    match_multiple: Optional[int] = None  # the step it moves in; None: 8, or what the chosen plugins need

    @property
    def embedding_width(self) -> int:
        """The width of token (and absolute position) embeddings: factorized or d_model."""
        return self.embedding_dim or self.d_model


#: The `model.` keys the core and the topologies read themselves, whichever plugins are
#: chosen (audited in config/spec.py, model/build.py, model/card.py, registry/topology/*.py,
#: the exporters for the token ids, and config/match.py for the match keys); every other
#: key is read only by the group nodes that interpolate it (see config/usage.py).
CORE_FIELDS = ("name", "path", "d_model", "n_layers", "n_heads", "head_dim", "vocab_size", "max_seq_len",
               "tie_embeddings", "embedding_dim", "type_vocab_size", "layer_pattern", "init_std",
               "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id",
               "match", "match_target", "match_by", "match_multiple")


@dataclass
class RootConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    position: Any = None
    norm: Any = None
    activation: Any = None
    attention: Any = None
    ffn: Any = None
    topology: Any = None
    task: Any = None
    data: Any = None
    compile: Any = None
    precision: Any = None
    scale: Any = None
    parallel: Any = None
    logger: Any = None
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N


# The root node the defaults list starts from (its groups' nodes are registered choices).
ConfigStore.instance().store(name="llmarch_schema", node=RootConfig, provider="llmarch_compose")
