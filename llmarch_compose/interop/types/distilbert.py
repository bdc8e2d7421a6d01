"""DistilBERT (DistilBertForMaskedLM): BERT's encoder (bert.py's `Encoder` mechanism)
without token types, LayerNorms of a fixed eps 1e-12, its own config spelling (`dim`,
`n_layers`, `n_heads`, `hidden_dim`, `activation`) and tensor names:
`distilbert.embeddings.{word,position}_embeddings` and `.LayerNorm`,
`distilbert.transformer.layer.{i}.attention.{q,k,v,out}_lin`, `sa_layer_norm`,
`ffn.lin1`, `ffn.lin2`, `output_layer_norm`, and the head `vocab_transform`,
`vocab_layer_norm`, `vocab_projector` (its weight the word embeddings unless untied,
its bias ours). The head applies `activation` as the FFN does.

`sinusoidal_pos_embds: true` is read as the learned table the checkpoint stores: in
transformers 5 the option only initializes `position_embeddings.weight` with sines and
cosines (a parameter that trains like any other), and `from_pretrained` loads the
checkpoint's table over it; the table is what computes. to_hf writes `false`, with the table.
"""

from __future__ import annotations

from typing import Any, Mapping

from .bert import Encoder, Names, encoder_type
from .common import family_guess, unused

# DistilBertConfig's fields and defaults, for config.json files that leave a field out.
DEFAULTS = {"vocab_size": 30522, "max_position_embeddings": 512, "sinusoidal_pos_embds": False, "n_layers": 6,
            "n_heads": 12, "dim": 768, "hidden_dim": 3072, "activation": "gelu", "pad_token_id": 0,
            "eos_token_id": None, "bos_token_id": None, "tie_word_embeddings": True}
FIELDS = {"d_model": "dim", "n_layers": "n_layers", "n_heads": "n_heads", "ffn_dim": "hidden_dim",
          "vocab_size": "vocab_size", "positions": "max_position_embeddings", "activation": "activation",
          "tie_embeddings": "tie_word_embeddings"}
# Fields DistilBERT configs saved by older transformers carry: `output_past` (an older use_cache) and
# `tie_weights_` (an older spelling of tying, which transformers 5 ignores: only true reads unambiguously).
LEGACY = {"output_past": True, "tie_weights_": True}


def distilbert_fields(hf: Mapping[str, Any]) -> list[str]:
    # sinusoidal_pos_embds: initialization only (see above); output_past: caching, never the logits.
    unused(hf, "sinusoidal_pos_embds", "output_past")
    return []


DISTILBERT = Encoder(
    "distilbert", "DistilBertForMaskedLM",
    Names(embeddings="distilbert.embeddings.", layer="distilbert.transformer.layer.{i}.",
          qkv=("attention.q_lin", "attention.k_lin", "attention.v_lin"), attn_out="attention.out_lin",
          attn_norm="sa_layer_norm", up="ffn.lin1", down="ffn.lin2", ffn_norm="output_layer_norm",
          head_dense="vocab_transform", head_norm="vocab_layer_norm", decoder="vocab_projector"),
    DEFAULTS, fields=FIELDS, extra_fields=LEGACY, own=distilbert_fields,
    own_back=lambda spec: {"sinusoidal_pos_embds": False})

TYPES = (encoder_type(DISTILBERT),)

guess = family_guess(TYPES)
