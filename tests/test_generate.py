"""Decoding over the KV cache each attention plugin declares, against the full forward.

For every preset at scale=tiny (every topology, attention and position among them) and
for every attention x position pairing, feeding a sequence through the cache (a prefill,
then one token per step) gives the logits of the uncached forward over the whole sequence,
within 1e-5 in fp32, past a sliding window's length too. Left padding changes nothing for
the padded row; the buffers allocated are the card's KV-cache figure exactly; sampling
filters agree with transformers' on fixed logits; bad requests are refused by key.
"""

from __future__ import annotations

import pytest
import torch

import llmarch_compose as lc
from llmarch_compose import Attention, ConfigError
from llmarch_compose.config.compose import presets
from llmarch_compose.inference.sampling import filter_logits
from llmarch_compose.model.card import kv_cache

TOL = 1e-5
SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=48",
         "model.vocab_size=64", "model.max_seq_len=64", "compile=eager"]


def _model(overrides, seed=0):
    torch.manual_seed(seed)
    return lc.build(lc.compose(overrides)).eval()


def _window(model) -> int:
    windows = [getattr(m, "window", None) for m in model.modules() if isinstance(m, Attention)]
    return max((w for w in windows if w is not None), default=0)


@torch.no_grad()
def _cached_logits(model, ids, split, prefix_len=None, source=None):
    """The logits of `ids` fed as a prefill of `split` tokens, then one token per step."""
    b, t = ids.shape
    if source is not None:
        state = model.new_decode_state(b, t, source_ids=source)
    elif prefix_len is not None:
        state = model.new_decode_state(b, t, prefix_len=prefix_len)
    else:
        state = model.new_decode_state(b, t)
    parts = [model.decode_step(ids[:, :split], state, all_logits=True).logits]
    state.memory = None
    for i in range(split, t):
        parts.append(model.decode_step(ids[:, i:i + 1], state, all_logits=True).logits)
    return torch.cat(parts, dim=1)


def _check_cached_equals_full(model, generator):
    vocab, limit = model.spec.model.vocab_size, model.spec.model.max_seq_len
    window = _window(model)
    t = min(limit, max(24, window + 8))  # past the window where there is one
    ids = torch.randint(0, vocab, (2, t), generator=generator)
    with torch.no_grad():
        if model.objective is lc.SEQ2SEQ:
            source = torch.randint(0, vocab, (2, min(limit, 20)), generator=generator)
            full = model(source, ids).logits
            cached = _cached_logits(model, ids, 1, source=source)
        elif model.objective is lc.MASKED_LM:
            full = model(ids).logits
            state = model.new_decode_state(2, t)
            cached = model.decode_step(ids, state, all_logits=True).logits
        elif getattr(model, "prefix_lm", False):
            prefix = torch.tensor([t // 3, t // 2])
            full = model(ids, prefix_len=prefix).logits
            cached = _cached_logits(model, ids, t // 2, prefix_len=prefix)
        else:
            full = model(ids).logits
            cached = _cached_logits(model, ids, t // 3)
    assert cached.shape == full.shape
    assert (cached - full).abs().max().item() < TOL, (cached - full).abs().max().item()
    return t, window


# A few small ones in the fast tier (a window, MLA with MoE, an encoder-decoder, an encoder,
# ALiBi, GLM's prefix); every preset in the full suite.
FAST_PRESETS = {"mistral_7b", "deepseek_v3", "t5_small", "bart_base", "bert_base", "baichuan2_13b", "chatglm_6b"}


@pytest.mark.parametrize("name", [p if p in FAST_PRESETS else pytest.param(p, marks=pytest.mark.slow)
                                  for p in presets() if p != "hf"])
def test_every_tiny_preset_decodes_with_the_logits_of_the_full_forward(name):
    model = _model([f"model={name}", "scale=tiny", "compile=eager"])
    t, window = _check_cached_equals_full(model, torch.Generator().manual_seed(1))
    # A windowed model is decoded past its window, where its context holds more than one.
    assert not window or window >= model.spec.model.max_seq_len or t > window


@pytest.mark.parametrize("attention", ["mha", "mqa", "gqa", "swa", "mla"])
@pytest.mark.parametrize("position", ["rope", "alibi", "learned", "sinusoidal", "relative_bias", "none"])
def test_every_attention_and_position_decode_with_the_full_forward_logits(attention, position):
    extra = ["model.window=6"] if attention == "swa" else []
    model = _model([*SMALL, f"attention={attention}", f"position={position}", *extra])
    _check_cached_equals_full(model, torch.Generator().manual_seed(2))


@pytest.mark.parametrize("topology", ["prefix_decoder", "encoder_decoder", "encoder_only"])
def test_other_topologies_decode_with_the_full_forward_logits(topology):
    model = _model([*SMALL, f"topology={topology}", "position=rope_2d" if topology == "prefix_decoder" else
                    "position=relative_bias"])
    _check_cached_equals_full(model, torch.Generator().manual_seed(3))


@pytest.mark.parametrize("overrides", [[], ["attention=swa", "model.window=5"], ["position=learned"],
                                       ["attention=mla", "position=alibi"],
                                       ["topology=encoder_decoder", "model.decoder_start_token_id=0"]])
def test_a_left_padded_row_generates_what_it_generates_alone(overrides):
    model = _model([*SMALL, *overrides])
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 64, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    batched = lc.generate(model, ids, 10, attention_mask=mask)
    alone = lc.generate(model, ids[1:, 5:], 10)
    assert torch.equal(batched[1, -10:], alone[0, -10:])
    first = lc.generate(model, ids[:1], 10)
    assert torch.equal(batched[0, -10:], first[0, -10:])


def test_greedy_generation_is_the_argmax_of_the_full_forward_step_by_step():
    model = _model([*SMALL, "attention=swa", "model.window=7"])
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))
    out = lc.generate(model, ids, 20)
    seq = ids
    with torch.no_grad():
        for _ in range(20):
            seq = torch.cat((seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("overrides", [["attention=mha"], ["attention=gqa"], ["attention=mqa"],
                                       ["attention=swa", "model.window=8"], ["attention=mla"],
                                       ["topology=encoder_decoder"]])
def test_buffers_allocated_are_the_cards_kv_cache_exactly(overrides):
    model = _model([*SMALL, *overrides])
    capacity = 40
    if model.objective is lc.SEQ2SEQ:
        state = model.new_decode_state(3, capacity, source_ids=torch.zeros(3, 10, dtype=torch.long))
    else:
        state = model.new_decode_state(3, capacity)
    card = kv_cache(model, 4, capacity)
    assert state.nbytes == 3 * card["kv_cache_bytes_full_context"]
    assert state.nbytes > 0


def test_kv_cache_ratios_are_the_surveys():
    """MQA holds 1/num_heads of MHA's cache, GQA 32 query / 4 KV heads 1/8, a window's stays flat."""
    base = ["model.d_model=256", "model.n_layers=1", "model.n_heads=32", "model.vocab_size=64",
            "model.max_seq_len=4096", "compile=eager"]
    bytes_of = {}
    for name, extra in (("mha", ["attention=mha"]), ("mqa", ["attention=mqa"]),
                        ("gqa", ["attention=gqa", "model.n_kv_heads=4"])):
        model = lc.build(lc.compose([*base, *extra]), device="meta")
        bytes_of[name] = sum(m.new_cache(1, 1024, torch.zeros(1, dtype=torch.long), device="meta").nbytes
                             for m in model.modules() if isinstance(m, Attention))
    assert bytes_of["mqa"] * 32 == bytes_of["mha"]
    assert bytes_of["gqa"] * 8 == bytes_of["mha"]
    swa = lc.build(lc.compose([*base, "attention=swa", "model.window=256"]), device="meta")
    layer = next(m for m in swa.modules() if isinstance(m, Attention))
    sizes = [layer.new_cache(1, n, torch.zeros(1, dtype=torch.long), device="meta").nbytes for n in (512, 2048, 4096)]
    assert sizes[0] == sizes[1] == sizes[2]


def test_eos_stops_each_row_and_pads_after_it():
    model = _model(SMALL)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(6))
    free = lc.generate(model, ids, 12)
    eos = int(free[0, 6 + 2])  # row 0's third new token
    out = lc.generate(model, ids, 12, eos_token_id=eos, pad_token_id=63)
    row0 = out[0, 6:].tolist()
    stop = row0.index(eos)
    assert stop <= 2 and all(t == 63 for t in row0[stop + 1:])
    if eos not in free[1, 6:].tolist():
        assert out.shape[1] == free.shape[1] and torch.equal(out[1], free[1])


def test_sampling_with_a_seed_is_reproducible_and_differs_across_seeds():
    model = _model(SMALL)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(7))
    a = lc.generate(model, ids, 16, do_sample=True, temperature=1.5, seed=11)
    b = lc.generate(model, ids, 16, do_sample=True, temperature=1.5, seed=11)
    c = lc.generate(model, ids, 16, do_sample=True, temperature=1.5, seed=12)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_top_k_and_top_p_agree_with_transformers_on_fixed_logits():
    generation = pytest.importorskip("transformers.generation.logits_process")
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(8)) * 3
    for temperature, top_k, top_p in ((1.0, 5, None), (0.7, None, 0.9), (1.3, 10, 0.5), (1.0, None, 0.05)):
        ours = filter_logits(logits, temperature, top_k, top_p)
        theirs = generation.TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_k is not None:
            theirs = generation.TopKLogitsWarper(top_k)(None, theirs)
        if top_p is not None:
            theirs = generation.TopPLogitsWarper(top_p)(None, theirs)
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
        kept = ~torch.isinf(ours)
        assert torch.allclose(ours[kept], theirs[kept])
        assert kept.sum(-1).min() >= 1


def test_sampled_tokens_stay_inside_the_filtered_set():
    model = _model(SMALL)
    ids = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        logits = model(ids).logits[:, -1]
    allowed = set(torch.topk(logits, 3).indices[0].tolist())
    for seed in range(20):
        out = lc.generate(model, ids, 1, do_sample=True, top_k=3, seed=seed)
        assert int(out[0, -1]) in allowed


@pytest.mark.parametrize("call, key", [
    (lambda m: lc.generate(m, torch.zeros(1, 65, dtype=torch.long), 1), "input_ids"),
    (lambda m: lc.generate(m, torch.zeros(1, 60, dtype=torch.long), 5), "max_new_tokens"),
    (lambda m: lc.generate(m, torch.zeros(1, 0, dtype=torch.long), 5), "input_ids"),
    (lambda m: lc.generate(m, torch.full((1, 3), 64), 5), "input_ids"),
    (lambda m: lc.generate(m, torch.zeros(1, 3, dtype=torch.long), -1), "max_new_tokens"),
    (lambda m: lc.generate(m, torch.zeros(1, 3, dtype=torch.long), 2, do_sample=True, temperature=0), "temperature"),
    (lambda m: lc.generate(m, torch.zeros(1, 3, dtype=torch.long), 2, do_sample=True, top_p=1.5), "top_p"),
    (lambda m: lc.generate(m, torch.zeros(1, 3, dtype=torch.long), 2, top_k=0), "top_k"),
    (lambda m: lc.generate(m, torch.zeros(2, 3, dtype=torch.long), 2,
                           attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1]])), "attention_mask"),
    (lambda m: lc.generate(m, torch.zeros(2, 3, dtype=torch.long), 2,
                           attention_mask=torch.tensor([[0, 0, 0], [1, 1, 1]])), "input_ids"),
])
def test_bad_requests_are_refused_by_key_before_any_work(call, key):
    model = _model(SMALL)
    with pytest.raises(ConfigError) as exc:
        call(model)
    assert exc.value.key == key


def test_an_attention_plugin_without_a_cache_is_refused_by_name():
    model = _model(SMALL)

    class Uncached(Attention):
        plugin_name = "uncached_attention"

        def forward(self, x, pos, memory=None):
            return x

    model.decoder.blocks[0].attn = Uncached()
    with pytest.raises(ConfigError) as exc:
        lc.generate(model, torch.zeros(1, 3, dtype=torch.long), 2)
    assert exc.value.key == "attention" and "uncached_attention" in str(exc.value)
    assert "gqa" in str(exc.value)  # the choices that do decode


def test_encoder_only_models_fill_masks_with_the_forward_argmax_padded_or_not():
    model = _model([*SMALL, "topology=encoder_only", "position=learned"])
    ids = torch.randint(0, 63, (2, 10), generator=torch.Generator().manual_seed(10))
    ids[:, 4] = 63
    with torch.no_grad():
        expected = torch.where(ids == 63, model(ids).logits.argmax(-1), ids)
    assert torch.equal(lc.fill_mask(model, ids, 63), expected)
    padded = torch.cat((torch.zeros(2, 3, dtype=torch.long), ids), dim=1)
    mask = torch.cat((torch.zeros(2, 3, dtype=torch.long), torch.ones_like(ids)), dim=1)
    assert torch.equal(lc.fill_mask(model, padded, 63, attention_mask=mask)[:, 3:], expected)
    with pytest.raises(ConfigError) as exc:
        lc.generate(model, ids, 2)
    assert exc.value.key == "topology"


@pytest.mark.slow
def test_compiled_decoding_equals_eager_and_never_recompiles_after_the_first_step():
    from torch._dynamo.utils import counters

    model = _model([*SMALL, "attention=swa", "model.window=6"])
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(12))
    eager = lc.generate(model, ids, 24)
    compiled = lc.generate(model, ids, 24, compile=True)
    assert torch.equal(eager, compiled)
    graphs = counters["stats"]["unique_graphs"]
    again = lc.generate(model, ids[:, 1:], 40, compile=True)  # another prompt length, more tokens: same graphs
    assert counters["stats"]["unique_graphs"] == graphs
    assert torch.equal(again, lc.generate(model, ids[:, 1:], 40))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mixtral_8x7b", "deepseek_v3", "t5_small", "chatglm_6b", "baichuan2_13b"])
def test_compiled_decoding_of_moe_mla_seq2seq_prefix_and_alibi_presets_equals_eager(name):
    # Two layers (more where the preset's layer pattern needs them): a graph per layer is most of the cost.
    model = _model([f"model={name}", "scale=tiny", "scale.n_layers=2", "compile=eager"])
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(13))
    assert torch.equal(lc.generate(model, ids, 6), lc.generate(model, ids, 6, compile=True))
