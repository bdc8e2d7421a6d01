"""Example llmarch_compose plugins: differential attention, Dynamic Tanh, a task
(`task=context_budget`) and a data source (`data=parity`).

They register when llmarch_compose loads this package's entry points
(`llmarch_extras.differential`, `.dyt`, `.budget`, `.parity`); nothing needs importing by hand.
"""

__version__ = "0.1.0"
