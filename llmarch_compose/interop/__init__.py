"""Interoperability with other frameworks' checkpoints (Hugging Face: `interop.hf`)."""
