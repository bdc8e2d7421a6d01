"""The build context: what a plugin may know of the model it is built into.

Every plugin class is constructed as `cls(params, ctx, **kwargs)`; `ctx` carries the
model's numbers, the other groups' params and the modules shared by every layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from . import registry as plugins

if TYPE_CHECKING:
    from ..config.spec import ModelSpec


class BuildContext:
    """What a plugin may know of the model it is built into: the numbers, the
    other groups' params, and the shared position and activation modules."""

    def __init__(self, spec: "ModelSpec"):
        self.spec = spec
        self.model = spec.model
        self._shared: dict[str, Any] = {}

    def build(self, group: str, layer: Optional[int] = None, stack: str = "decoder", **kwargs: Any) -> Any:
        """A new instance of the plugin chosen for `group`, at `layer` of `stack`
        when a layer pattern may change it there (attention and FFN plugins also
        receive `layer_idx`)."""
        params = self.spec.params_for(group, layer, stack)
        if layer is not None and group in ("attention", "ffn"):
            kwargs["layer_idx"] = layer
        module = plugins.get(group, params.plugin).cls(params, self, **kwargs)
        # The params it was built from (its layer's own), so that a description of the built
        # model (`task=diagram`) names each part as the config chose it.
        module.plugin_params = params
        return module

    def shared(self, group: str) -> Any:
        """One instance of `group` shared by every layer (position encodings,
        activations): built on first use, then reused."""
        if group not in self._shared:
            self._shared[group] = self.build(group)
        return self._shared[group]

    @property
    def position(self):
        return self.shared("position")

    @property
    def activation(self):
        return self.shared("activation")
