"""ELECTRA's generator (ElectraForMaskedLM): BERT's encoder (bert.py's `Encoder`
mechanism) under `electra.`, with embeddings `embedding_size` wide (our
`model.embedding_dim`), projected to `hidden_size` by `electra.embeddings_project` when
the two differ (our `embed.project`), and the generator's head:
`generator_predictions.dense` (hidden_size -> embedding_size), GELU,
`generator_predictions.LayerNorm`, and `generator_lm_head` (its weight the word
embeddings unless untied, its bias ours).

The generator head applies exact GELU whatever `hidden_act` says (ours applies the
model's one activation in FFN and head): another `hidden_act` is refused. The
discriminator (ElectraForPreTraining, `discriminator_predictions`) has no masked-LM
head: its checkpoints lack the generator's tensors and are refused, naming one.
"""

from __future__ import annotations

from typing import Any, Mapping

from .bert import BERT_LAYER, LEGACY, Encoder, Names, cache_flag, encoder_type
from .common import family_guess, unused

# ElectraConfig's fields and defaults, for config.json files that leave a field out.
DEFAULTS = {"vocab_size": 30522, "embedding_size": 128, "hidden_size": 256, "num_hidden_layers": 12,
            "num_attention_heads": 4, "intermediate_size": 1024, "hidden_act": "gelu", "max_position_embeddings": 512,
            "type_vocab_size": 2, "layer_norm_eps": 1e-12, "summary_type": "first", "summary_use_proj": True,
            "summary_activation": "gelu", "pad_token_id": 0, "is_decoder": False, "add_cross_attention": False,
            "bos_token_id": None, "eos_token_id": None, "tie_word_embeddings": True}


def electra_fields(hf: Mapping[str, Any]) -> list[str]:
    # summary_*: the sequence summary of ElectraForMultipleChoice; the masked-LM model has none.
    unused(hf, "summary_type", "summary_use_proj", "summary_activation")
    return cache_flag(hf)


ELECTRA = Encoder(
    "electra", "ElectraForMaskedLM",
    Names(embeddings="electra.embeddings.", layer="electra.encoder.layer.{i}.", **BERT_LAYER,
          head_dense="generator_predictions.dense", head_norm="generator_predictions.LayerNorm",
          decoder="generator_lm_head", project="electra.embeddings_project"),
    DEFAULTS, extra_fields=LEGACY, own=electra_fields, factorized="optional", gelu_head=True)

TYPES = (encoder_type(ELECTRA),)

guess = family_guess(TYPES)
