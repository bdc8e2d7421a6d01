"""RoBERTa (RobertaForMaskedLM) and XLM-RoBERTa (XLMRobertaForMaskedLM): BERT's encoder
(bert.py's `Encoder` mechanism) with the tensors under `roberta.` and the head
`lm_head.{dense,layer_norm}`, `lm_head.bias` (untied: `lm_head.decoder`); the two types
differ only in name and their config class's defaults.

Positions. transformers computes RoBERTa's position ids from the input ids
(`create_position_ids_from_input_ids`): a token equal to `pad_token_id` gets row
`pad_token_id` of the table, every other token row `pad_token_id + 1 + (the number of
non-padding tokens before it)`. Ours is a learned table with `model.position_offset =
pad_token_id + 1`: token t gets row `t + pad_token_id + 1`, whatever its id. The two agree
exactly on every sequence without `pad_token_id`, and on the real tokens of a left-padded
batch given with its mask (`fill_mask(..., attention_mask=...)`: padding is masked and
positions count from the first real token). Where `pad_token_id` stands unmasked inside or
at the end of a sequence, transformers gives it the padding row and does not count it,
ours counts it like any token: the logits differ (tests/test_interop_encoders.py shows
both). A position depending on the token ids is not expressible in our position plugins.

Refused: a head activation other than exact GELU (transformers' RoBERTa head applies
GELU whatever `hidden_act` says, ours the model's one activation), a config without
`pad_token_id`, and what BERT refuses (causal, cross-attention, relative positions).
"""

from __future__ import annotations

from .bert import BERT_LAYER, LEGACY, Encoder, Names, cache_flag, encoder_type
from .common import family_guess

# RobertaConfig's fields and defaults; XLMRobertaConfig's differ in the vocabulary only.
DEFAULTS = {"vocab_size": 50265, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
            "intermediate_size": 3072, "hidden_act": "gelu", "max_position_embeddings": 512, "type_vocab_size": 2,
            "layer_norm_eps": 1e-12, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "is_decoder": False,
            "add_cross_attention": False, "tie_word_embeddings": True}
NAMES = Names(embeddings="roberta.embeddings.", layer="roberta.encoder.layer.{i}.", **BERT_LAYER,
              head_dense="lm_head.dense", head_norm="lm_head.layer_norm", decoder="lm_head.decoder",
              head_bias="lm_head.bias", pooler="roberta.pooler.dense")


def roberta(name: str, architecture: str, vocab_size: int) -> Encoder:
    return Encoder(name, architecture, NAMES, {**DEFAULTS, "vocab_size": vocab_size}, extra_fields=LEGACY,
                   own=cache_flag, gelu_head=True, positions_after_pad=True)


TYPES = (encoder_type(roberta("roberta", "RobertaForMaskedLM", 50265)),
         encoder_type(roberta("xlm-roberta", "XLMRobertaForMaskedLM", 30522)))

guess = family_guess(TYPES)
