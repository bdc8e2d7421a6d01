"""YAML variants of this package's plugins, added to Hydra's search path by
`hydra_plugins.llmarch_extras`."""
