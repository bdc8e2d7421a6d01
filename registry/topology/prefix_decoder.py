
from llmarch_compose import register

from .decoder_only import DecoderOnly
from .stack import TopologyParams


@register("topology", "prefix_decoder", params=TopologyParams)
class PrefixDecoder(DecoderOnly):
    """A prefix LM (GLM): bidirectional attention over a prefix of `prefix_len`
    tokens per sequence, causal over the rest; no prefix means a causal LM."""

    table_name = "Prefix-Decoder"

    prefix_lm = True
