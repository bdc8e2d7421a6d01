"""The `precision` group: which dtype the weights live in and what autocast does.

- `fp32`: weights and arithmetic in float32 (the default, and the reference);
- `bf16`: weights cast to bfloat16 (inference, or training where bf16 AdamW is acceptable);
- `mixed`: float32 master weights, matrix products under bfloat16 autocast.

Precise buffers (RoPE's frequencies, a router's bias) stay float32 under any
cast: see `PreciseBuffers`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
from ..errors import ConfigError
from ..plugin.registry import add

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class PrecisionConfig:
    name: str = "fp32"
    param_dtype: str = "fp32"  # the dtype the weights are stored and updated in
    autocast_dtype: Optional[str] = None  # None: no autocast; bf16 | fp16: autocast's compute dtype

    def validate(self, key: str = "precision") -> None:
        if self.param_dtype not in DTYPES:
            raise ConfigError(f"{key}.param_dtype", self.param_dtype, "unknown dtype", sorted(DTYPES))
        if self.autocast_dtype is not None and self.autocast_dtype not in DTYPES:
            raise ConfigError(f"{key}.autocast_dtype", self.autocast_dtype, "unknown dtype",
                              [*sorted(DTYPES), "null"])

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.param_dtype]

    def autocast(self, device: torch.device):
        """The context a forward pass runs in: autocast when asked, else nothing."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[self.autocast_dtype])


PRECISIONS = {
    "fp32": PrecisionConfig("fp32", "fp32", None),
    "bf16": PrecisionConfig("bf16", "bf16", None),
    "mixed": PrecisionConfig("mixed", "fp32", "bf16"),
}

for _name, _node in PRECISIONS.items():
    add("precision", _name, node=_node)
