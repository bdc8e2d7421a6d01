"""ALBERT (AlbertForMaskedLM): BERT's encoder (bert.py's `Encoder` mechanism) with
factorized embeddings and shared layers. The token, position and token-type tables are
`embedding_size` wide (our `model.embedding_dim`), normalized at that width, then
projected to `hidden_size` (`albert.encoder.embedding_hidden_mapping_in`: our
`embed.project`); the head's dense maps back to `embedding_size` before the tied decoder.

Layers: transformers runs `num_hidden_layers` layers, layer i with the weights of group
`i * num_hidden_groups // num_hidden_layers`, each group `inner_group_num` layers deep.
Ours shares one block among all layers (`topology.share_layers=true`: one group) or none
(one group per layer): `num_hidden_groups` must be 1 or `num_hidden_layers`, and
`inner_group_num` 1; anything else (groups of several layers, or several blocks per group)
is refused by name. The layer's tensors are
`albert.encoder.albert_layer_groups.{g}.albert_layers.0.attention.{query,key,value,dense,LayerNorm}`,
`ffn`, `ffn_output`, `full_layer_layer_norm`; the head `predictions.{dense,LayerNorm,bias}`
(untied: `predictions.decoder`). ALBERT projects its embeddings even when `embedding_size`
equals `hidden_size`, which ours does not: such a config is refused too.

AlbertForPreTraining checkpoints (albert/albert-base-v2) also hold the pooler
(`albert.pooler`, read with `topology.pooler=true`) and the sentence-order head
(`sop_classifier`), which the masked-LM model does not use.
"""

from __future__ import annotations

from typing import Any, Mapping

from ...errors import ConfigError
from ..mapping import override
from .bert import Encoder, Names, encoder_type
from .common import family_guess, refuse

# AlbertConfig's fields and defaults, for config.json files that leave a field out.
DEFAULTS = {"vocab_size": 30000, "embedding_size": 128, "hidden_size": 4096, "num_hidden_layers": 12,
            "num_hidden_groups": 1, "num_attention_heads": 64, "intermediate_size": 16384, "inner_group_num": 1,
            "hidden_act": "gelu_new", "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
            "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3, "tie_word_embeddings": True}
# Fields of the original ALBERT configs (albert-base-v2 carries them) that transformers never reads, at
# the values those configs hold; and `position_embedding_type`, which transformers before 5 saved.
LEGACY = {"down_scale_factor": 1, "gap_size": 0, "net_structure_type": 0, "num_memory_blocks": 0,
          "position_embedding_type": "absolute"}


def albert_layers(hf: Mapping[str, Any]) -> list[str]:
    layers, groups = hf["num_hidden_layers"], hf["num_hidden_groups"]
    refuse(hf, "inner_group_num", "several layers in each group (ours shares one block, or none)", allowed=(1,))
    if groups not in (1, layers):
        raise ConfigError("num_hidden_groups", groups, "cannot be represented: groups of several layers sharing "
                          "weights (ours shares one block among all layers, or none)", [1, layers])
    return [override("topology.share_layers", groups < layers)]


def albert_layers_back(spec: Any) -> dict[str, Any]:
    shared = spec.params["topology"].share_layers
    return {"num_hidden_groups": 1 if shared else spec.model.n_layers, "inner_group_num": 1}


ALBERT = Encoder(
    "albert", "AlbertForMaskedLM",
    Names(embeddings="albert.embeddings.", layer="albert.encoder.albert_layer_groups.{i}.albert_layers.0.",
          qkv=("attention.query", "attention.key", "attention.value"), attn_out="attention.dense",
          attn_norm="attention.LayerNorm", up="ffn", down="ffn_output", ffn_norm="full_layer_layer_norm",
          head_dense="predictions.dense", head_norm="predictions.LayerNorm", decoder="predictions.decoder",
          head_bias="predictions.bias", project="albert.encoder.embedding_hidden_mapping_in",
          pooler="albert.pooler", other_heads=("sop_classifier.",)),
    DEFAULTS, extra_fields=LEGACY, own=albert_layers, own_back=albert_layers_back, factorized="required",
    shares_layers=True)

TYPES = (encoder_type(ALBERT),)

guess = family_guess(TYPES)
