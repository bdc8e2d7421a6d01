"""The Hydra config tree, installed as package data (loaded with pkg://llmarch_compose.conf)."""
