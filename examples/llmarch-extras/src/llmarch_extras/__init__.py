"""Example llmarch_compose plugins: differential attention and Dynamic Tanh.

The plugins register when llmarch_compose loads this package's entry points
(`llmarch_extras.differential`, `llmarch_extras.dyt`); nothing needs importing by hand.
"""

__version__ = "0.1.0"
