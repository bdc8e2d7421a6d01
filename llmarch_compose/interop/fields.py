"""Every field of a Hugging Face config.json is read by the mapping, or refused.

A config.json may hold three kinds of field:

- the model type's own: its transformers config class's fields, which the type's
  `defaults` table lists whole (with a few older spellings transformers still reads);
- the fields every transformers config carries (`GENERIC`): bookkeeping, output
  flags and generation settings, which never change what the model computes, and a
  few that would (`GENERIC_DEFAULTS`: `is_decoder` makes BERT causal) unless they
  keep their default;
- anything else: not a field of this type at all (a Gemma checkpoint relabelled
  `llama` still says `hidden_activation`), refused by name.

The mapping reads the fields it uses through a `Reading`, which records them; a field
of the type's own that was never read must hold its default or be `inert`
(initialization, dropout: nothing computed from trained weights depends on them),
else it is refused, naming it. So a field a mapping forgot, or one a newer
transformers adds, is never silently dropped.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from ..errors import ConfigError

#: Fields of every transformers config (and of older ones' serializations) that do not change
#: what the model computes: bookkeeping, output switches, label names, and generation settings
#: that older config.json files carry (generation reads its own settings, not these).
GENERIC = frozenset({
    "architectures", "model_type", "transformers_version", "_name_or_path", "dtype", "torch_dtype",
    "use_cache", "return_dict", "use_return_dict", "output_hidden_states", "output_attentions", "torchscript",
    "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "num_labels", "problem_type",
    "finetuning_task", "tokenizer_class", "prefix", "task_specific_params", "sep_token_id",
    # special token ids: read for generation whenever present (llmarch_compose.interop.hf.TOKENS)
    "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id",
    "_attn_implementation_autoset", "output_router_logits", "gradient_checkpointing",
    # generation settings stored in the model's config.json before generation_config.json existed
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
    "output_scores", "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
})

#: Fields of every transformers config that change the model unless at these values.
GENERIC_DEFAULTS: Mapping[str, Any] = {
    "is_decoder": False, "add_cross_attention": False, "cross_attention_hidden_size": None,
    "tie_encoder_decoder": False, "pruned_heads": {},
}

#: Fields whose presence alone means the checkpoint is not plain weights of this type.
REFUSED = {
    "auto_map": "the checkpoint's modeling code is its own (remote code), which is never run here",
    "quantization_config": "quantized weights are not read; load a full-precision checkpoint",
}


def inert(field: str) -> bool:
    """Initialization and dropout settings: they shape training, not the function of given weights
    (our models have no dropout)."""
    return ("dropout" in field or field.endswith(("_pdrop", "layerdrop")) or field.startswith("init")
            or field in ("router_jitter_noise",))


class Reading(dict):
    """A config.json (merged with its type's defaults) that records which fields are read."""

    def __init__(self, fields: Mapping[str, Any]):
        super().__init__(fields)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)


def unused(hf: Mapping[str, Any], *fields: str) -> None:
    """Mark fields as read that the mapping has decided do not matter (say why at the call)."""
    for field in fields:
        hf.get(field)


def check_known(hf: Mapping[str, Any], type_name: str, defaults: Mapping[str, Any],
                others: Mapping[str, Iterable[str]]) -> None:
    """Refuse a field that is neither the type's own nor generic; `others`: the other mapped types'
    fields, to say whose the field is."""
    for field, value in hf.items():
        if field in REFUSED and value not in (None, {}):
            raise ConfigError(field, _short(value), f"cannot be represented: {REFUSED[field]}")
        if field in defaults or field in GENERIC or field in GENERIC_DEFAULTS or field in REFUSED or inert(field):
            continue
        owners = sorted(name for name, fields in others.items() if field in fields)
        hint = (f"; the {', '.join(owners[:4])} config{'s have' if len(owners) > 1 else ' has'} it: is the "
                "checkpoint of that type?") if owners \
            else "; a checkpoint whose config has fields its type lacks may compute something else"
        raise ConfigError(field, _short(value), f"not a field of {type_name}'s config{hint}",
                          "the fields of transformers' config class for this model_type")


def check_read(hf: Mapping[str, Any], reading: Reading, type_name: str, defaults: Mapping[str, Any]) -> None:
    """Refuse a field of the checkpoint's config that the mapping never read and that does not hold
    its default: the model it describes would not be the one built."""
    for field, value in hf.items():
        if field in reading.read or field in GENERIC or inert(field) or field in REFUSED:
            continue
        default = GENERIC_DEFAULTS.get(field, defaults.get(field))
        if value != default and not (value is None and default in ({}, [])):
            raise ConfigError(field, _short(value), f"cannot be represented: the {type_name} mapping has no use "
                              f"for this field, and it is not at transformers' default", [_short(default)])


def _short(value: Any) -> Any:
    """A value as an error message shows it: bounded, whatever a file held."""
    text = repr(value)
    return value if len(text) <= 120 else text[:117] + "..."
