"""The checks every mapped Hugging Face model type passes, shared by the family test files.

A family's test file declares its `Case`s (a tiny transformers config and its model class)
and takes the standard tests with `globals().update(parity_tests(CASES))`:

- `test_logits_match_transformers` (fast): the model transformers builds with random weights
  (eager attention and experts), saved with `save_pretrained` and read with `from_hf`, gives
  transformers' logits within 1e-4 in float32;
- `test_compiled_logits_match_transformers` (slow): the same, compiled with fullgraph=True, for
  the first case of each transformers model class;
- `test_round_trip_loads_cleanly_in_transformers` (slow): `to_hf` under the case's model type,
  then `from_pretrained`, has no missing, unexpected or mismatched keys, is the same class, and
  gives the same logits; read back with `from_hf`, ours does too;
- `test_greedy_equals_transformers` (slow): `llmarch_compose.generate` decodes the tokens
  transformers' `generate` does (32, greedy, fp32), on a path whose choices are well separated;
  an encoder-only case fills masks as transformers' masked-LM argmax does.

Weights are drawn larger than transformers' initialization (norms near one, biases small, routers
wide so that no top-k choice is a near tie) so that a wrong mapping shows in the logits; the greedy
check draws them larger still (`std`, `own_std`), so that its choices are far apart, on a model of
its own: at that scale float32 rounding alone moves logits by more than the 1e-4 the others hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import llmarch_compose as lc  # noqa: E402
from llmarch_compose.interop.hf import from_hf, to_hf  # noqa: E402
from test_generate_hf import MARGIN, NEVER, NEW, PROMPT, assert_same, hf_generate, least_margin  # noqa: E402

VOCAB = 128
IDS = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
TARGETS = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))


def config(cls, base: dict, **changes):
    """A Case's config: transformers' config class `cls` on a family's small base, changed."""
    return lambda: cls(**{**base, **changes})


@dataclass
class Case:
    """One tiny transformers model of a mapped type."""

    config: Callable[[], Any]  # () -> a transformers config (vocabulary VOCAB)
    model: type  # the transformers model class (…ForCausalLM, …ForMaskedLM, …ForConditionalGeneration)
    seed: int = 0
    std: float = 0.2  # the greedy check's weight scale; norm weights are 1 + 0.1 * noise, biases 0.02 * noise
    own_std: dict[str, float] = field(default_factory=dict)  # greedy: a part of a parameter's name -> its std
    logit_std: float = 0.08  # the weight scale of the logits and round-trip checks
    prepare: Optional[Callable[[nn.Module], None]] = None  # a change to the model before randomizing
    decode: bool = True  # whether the greedy check applies (a type transformers cannot generate with)
    mask_id: int = 2  # encoder-only: the id masked positions hold

    @property
    def kind(self) -> str:
        name = self.model.__name__
        seq2seq = "Conditional" in name or name.endswith("MTModel")  # MarianMTModel
        return "masked" if name.endswith("ForMaskedLM") else "seq2seq" if seq2seq else "causal"


ROUTERS = ("mlp.gate.weight", "block_sparse_moe.gate.weight", "router.weight")


def randomize(model: nn.Module, case: Case, greedy: bool) -> nn.Module:
    g = torch.Generator().manual_seed(case.seed)
    own_std = case.own_std if greedy else {}
    std = case.std if greedy else case.logit_std
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:  # a fixed table stored as a frozen parameter (Marian's sinusoids)
                continue
            noise = torch.randn(p.shape, generator=g)
            own = [s for part, s in own_std.items() if part in name]
            if own:
                p.copy_(own[0] * noise)
            elif name.endswith(ROUTERS):
                p.copy_(noise)
            elif p.ndim == 1 and ("norm" in name.lower() or "ln" in name) and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("bias") and p.ndim == 1:
                p.copy_(0.02 * noise)
            else:
                p.copy_(std * noise)
        for name, b in model.named_buffers():
            if name.endswith(("e_score_correction_bias", "final_logits_bias")):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model.eval()


def build_hf(case: Case, greedy: bool = False) -> nn.Module:
    config = case.config()
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    torch.manual_seed(case.seed)
    model = case.model(config)
    if case.prepare is not None:
        case.prepare(model)
    return randomize(model, case, greedy)


def logits(model: nn.Module, kind: str) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(model, transformers.PreTrainedModel):
            if kind == "seq2seq":
                return model(input_ids=IDS, decoder_input_ids=TARGETS).logits
            return model(input_ids=IDS).logits
        return (model(IDS, TARGETS) if kind == "seq2seq" else model(IDS)).logits


_PAIRS: dict[tuple[str, bool], tuple[nn.Module, Any, nn.Module]] = {}


def pair(cases: dict[str, Case], name: str, tmp_path_factory, greedy: bool = False
         ) -> tuple[nn.Module, Any, nn.Module]:
    """(transformers' model, our config, our model read from the folder it saves), once per case."""
    if (name, greedy) not in _PAIRS:
        hf = build_hf(cases[name], greedy)
        folder = tmp_path_factory.mktemp(name)
        hf.save_pretrained(folder)
        cfg, ours = from_hf(folder)
        _PAIRS[name, greedy] = hf, cfg, ours.eval()
    return _PAIRS[name, greedy]


def check_round_trip(case: Case, hf: nn.Module, cfg: Any, ours: nn.Module, out) -> None:
    to_hf(ours, cfg, out, model_type=hf.config.model_type)
    back, info = case.model.from_pretrained(out, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    back.config._experts_implementation = "eager"
    assert type(back) is type(hf)
    expected = logits(hf, case.kind)
    torch.testing.assert_close(logits(back.eval(), case.kind), expected, atol=1e-4, rtol=0)
    _, again = from_hf(out)
    torch.testing.assert_close(logits(again.eval(), case.kind), expected, atol=1e-4, rtol=0)


def check_greedy(case: Case, hf: nn.Module, ours: nn.Module) -> None:
    if case.kind == "masked":
        ids = PROMPT.clone()
        masked = torch.zeros_like(ids, dtype=torch.bool)
        masked[0, [1, 4, 9]] = masked[1, [0, 5, 6, 11]] = True
        ids[masked] = case.mask_id
        with torch.no_grad():
            theirs = hf(ids).logits
        filled = lc.fill_mask(ours, ids, case.mask_id)
        assert least_margin(theirs[masked]) > MARGIN, "choices too close to call: scale the weights"
        assert torch.equal(filled[masked], theirs.argmax(-1)[masked])
        assert torch.equal(filled[~masked], ids[~masked])
        return
    theirs, scores = hf_generate(hf, PROMPT)
    mine = lc.generate(ours, PROMPT, NEW, eos_token_id=NEVER)
    assert_same(mine, theirs, scores)


def parity_tests(cases: dict[str, Case]) -> dict[str, Callable]:
    """The standard tests over `cases`, as module-level test functions."""
    names = sorted(cases)
    decoding = sorted(n for n in names if cases[n].decode)
    # Compiled: the first case of each transformers class (compiling is most of the cost; the
    # options the other cases vary are held by the eager check).
    compiled = [n for n in names if n == next(m for m in names if cases[m].model is cases[n].model)]

    @pytest.mark.parametrize("name", names)
    def test_logits_match_transformers(name, tmp_path_factory):
        hf, _, ours = pair(cases, name, tmp_path_factory)
        kind = cases[name].kind
        torch.testing.assert_close(logits(ours, kind), logits(hf, kind), atol=1e-4, rtol=0)

    @pytest.mark.slow
    @pytest.mark.parametrize("name", compiled)
    def test_compiled_logits_match_transformers(name, tmp_path_factory):
        torch._dynamo.reset()
        hf, _, ours = pair(cases, name, tmp_path_factory)
        kind = cases[name].kind
        compiled = torch.compile(ours, fullgraph=True)
        torch.testing.assert_close(logits(compiled, kind), logits(hf, kind), atol=1e-4, rtol=0)

    @pytest.mark.slow
    @pytest.mark.parametrize("name", names)
    def test_round_trip_loads_cleanly_in_transformers(name, tmp_path_factory, tmp_path):
        hf, cfg, ours = pair(cases, name, tmp_path_factory)
        check_round_trip(cases[name], hf, cfg, ours, tmp_path / "out")

    @pytest.mark.slow
    @pytest.mark.parametrize("name", decoding)
    def test_greedy_equals_transformers(name, tmp_path_factory):
        hf, _, ours = pair(cases, name, tmp_path_factory, greedy=True)
        check_greedy(cases[name], hf, ours)

    return {f.__name__: f for f in (test_logits_match_transformers, test_compiled_logits_match_transformers,
                                    test_round_trip_loads_cleanly_in_transformers, test_greedy_equals_transformers)}
