"""The inference graph: generation over the KV cache each attention plugin declares."""
