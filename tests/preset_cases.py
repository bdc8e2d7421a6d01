"""The presets the compiled checks run at `scale=tiny`: each preset whose tiny spec
differs from every other's. A preset left out is identical at that scale to the one
it names (the same components, numbers and options; only the size it scales from
differs), so compiling it again proves nothing new;
`test_all_presets.py::test_presets_left_out_of_compiled_checks_are_identical_at_tiny`
holds that true as presets change."""

from __future__ import annotations

from llmarch_compose.config.compose import presets

#: preset -> the preset whose tiny spec it equals.
SAME_AT_TINY = {
    "bert_large": "bert_base", "gpt2_xl": "gpt2", "llama2_13b": "llama2_7b", "llama3_70b": "llama3_8b",
    "qwen2_1_5b": "qwen2_0_5b", "xlm_roberta_base": "roberta_base",
    "t5_base": "t5_small", "t5_large": "t5_small", "t5_3b": "t5_small", "t5_11b": "t5_small",
    "mt5_base": "flan_t5_base",
}

#: Every preset that is not the twin of another at `scale=tiny`.
DISTINCT_AT_TINY = [p for p in presets() if p not in SAME_AT_TINY]
