"""Dynamic Tanh against its formula, the checks of llmarch_compose.testing, and its errors."""

import pytest
import torch

from llmarch_compose import ConfigError, compose, resolve_spec
from llmarch_compose.testing import TINY_MODEL, build_with, check_plugin
from llmarch_extras.dyt import DynamicTanh


def test_matches_formula():
    pm = build_with("norm", "dyt", ["norm.alpha_init=0.8"])
    norm = pm.instances[0]
    assert isinstance(norm, DynamicTanh) and norm.alpha.item() == pytest.approx(0.8)
    with torch.no_grad():
        norm.weight.copy_(torch.randn_like(norm.weight))
        norm.bias.copy_(torch.randn_like(norm.bias))
    x = torch.randn(3, 5, norm.weight.numel()) * 4
    want = torch.stack([torch.stack([norm.weight[c] * torch.tanh(0.8 * x[i, j, c]) + norm.bias[c]
                                     for c in range(x.shape[-1])]) for i in range(3) for j in range(5)])
    torch.testing.assert_close(norm(x).detach().reshape(15, -1), want.detach())


def test_every_norm_of_the_model_is_dyt():
    """Block norms, the final norm, and the width a caller asks for (a per-head norm)."""
    pm = build_with("norm", "dyt", ["attention=gqa", "model.qk_norm=true"])
    widths = sorted({m.weight.numel() for m in pm.instances})
    m = resolve_spec(pm.cfg).model
    assert widths == sorted({m.head_dim, m.d_model})


def test_plugin_checks_pass():
    report = check_plugin("norm", "dyt")
    assert "compiled (whole)" in report.checks


def test_alpha_must_be_positive():
    with pytest.raises(ConfigError) as info:
        resolve_spec(compose([*TINY_MODEL, "norm=dyt", "norm.alpha_init=0"]))
    assert info.value.key == "norm.alpha_init"
