from llmarch_compose import PositionEncoding, register


@register("position", "none")
class NoPosition(PositionEncoding):
    """No position information (order only through a causal mask)."""

    table_name = "none"

    def __init__(self, params, ctx, causal: bool = True):
        super().__init__()
