"""Greedy decoding equals transformers' `generate`, token for token, on the same weights.

Every model type the interop maps is built here as a tiny random transformers model
(eager attention and experts, no download), converted with `from_hf` from the folder
`save_pretrained` writes, and decoded 32 new tokens in float32 both ways: gpt2, llama,
mistral (prompt plus generation past its sliding window), qwen2, mixtral, qwen2_moe,
qwen3_moe, glm, deepseek_v3 (decoder-only, through the KV cache each attention declares),
t5 (v1.0 and v1.1 / Flan) and bart (encoder-decoders, from their decoder start token,
over the cross-attention cache), and bert (encoder-only: `fill_mask` against transformers'
masked-LM argmax). Left-padded batches go with their attention mask.

Weights are scaled so that greedy choices are well separated: along transformers' own
path every step's best logit leads the runner-up by at least `MARGIN`, which the tests
check, so agreement is not luck and a disagreement is a bug, not a tie broken
differently by rounding.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import llmarch_compose as lc  # noqa: E402
from llmarch_compose.interop.hf import from_hf  # noqa: E402
from test_interop_moe_glm import SMALL, _deepseek_v3  # noqa: E402  (the same tiny configs)

VOCAB = 128
NEW = 32
NEVER = VOCAB  # an end-of-sequence id no model can emit: every row decodes all NEW tokens
MARGIN = 2e-4  # the least lead of the best logit over the runner-up: twice the 1e-4 the interop tests hold logits to
PROMPT = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))  # 0 .. 2: special ids
WINDOW = 8  # mistral's sliding window: the 12-token prompt alone exceeds it, and 44 tokens in all

LLAMA = dict(SMALL, num_hidden_layers=2, num_key_value_heads=2)


#: case -> (transformers config, model class)
CONFIGS: dict[str, Callable[[], tuple[transformers.PretrainedConfig, type]]] = {
    "gpt2": lambda: (transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                                             bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1),
                     transformers.GPT2LMHeadModel),
    "llama": lambda: (transformers.LlamaConfig(**LLAMA), transformers.LlamaForCausalLM),
    "mistral": lambda: (transformers.MistralConfig(**LLAMA, sliding_window=WINDOW), transformers.MistralForCausalLM),
    "qwen2": lambda: (transformers.Qwen2Config(**LLAMA, tie_word_embeddings=True), transformers.Qwen2ForCausalLM),
    "mixtral": lambda: (transformers.MixtralConfig(**LLAMA, num_local_experts=4, num_experts_per_tok=2),
                        transformers.MixtralForCausalLM),
    # Layer 1 dense (mlp_only_layers), a gated shared expert on the others.
    "qwen2_moe": lambda: (transformers.Qwen2MoeConfig(**SMALL, num_hidden_layers=3, num_key_value_heads=2,
                                                      moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                                      num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
                                                      mlp_only_layers=[1]),
                          transformers.Qwen2MoeForCausalLM),
    "qwen3_moe": lambda: (transformers.Qwen3MoeConfig(**SMALL, num_hidden_layers=2, num_key_value_heads=2,
                                                      head_dim=16, moe_intermediate_size=32, num_experts=8,
                                                      num_experts_per_tok=2, norm_topk_prob=True),
                          transformers.Qwen3MoeForCausalLM),
    "glm": lambda: (transformers.GlmConfig(**SMALL, num_hidden_layers=2, num_key_value_heads=2, head_dim=16,
                                           pad_token_id=0, rms_norm_eps=1e-5),
                    transformers.GlmForCausalLM),
    "deepseek_v3": lambda: (_deepseek_v3(), transformers.DeepseekV3ForCausalLM),
    "t5": lambda: (transformers.T5Config(d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4, vocab_size=VOCAB,
                                         decoder_start_token_id=0),
                   transformers.T5ForConditionalGeneration),
    # v1.1 / Flan-T5: gated GELU, a head of its own, buckets reaching only 20 tokens: the
    # decoder's 33 steps pass them, so the far buckets are read from the cache.
    "t5_v1_1": lambda: (transformers.T5Config(d_model=64, d_kv=8, d_ff=96, num_layers=2, num_heads=4,
                                              vocab_size=VOCAB, decoder_start_token_id=0,
                                              feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                              relative_attention_num_buckets=16, relative_attention_max_distance=20),
                        transformers.T5ForConditionalGeneration),
    "bart": lambda: (transformers.BartConfig(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                             decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96,
                                             vocab_size=VOCAB, max_position_embeddings=64),
                     transformers.BartForConditionalGeneration),
    "bert": lambda: (transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=64),
                     transformers.BertForMaskedLM),
}
DECODERS = ["gpt2", "llama", "mistral", "qwen2", "mixtral", "qwen2_moe", "qwen3_moe", "glm", "deepseek_v3"]
SEQ2SEQ = ["t5", "t5_v1_1", "bart"]


#: case -> (the seed, the std of the weights, {part of a parameter name: its own std}); others
#: (0, 0.2, {}). Random models with tied heads tend to lock greedy decoding onto one token (the
#: input's own, or one the constant parts favour); wider query and key projections (sharper
#: attention) keep the encoder-decoders' paths moving, so each row of 32 tokens says something.
WEIGHTS: dict[str, tuple[int, float, dict[str, float]]] = {
    "gpt2": (0, 0.25, {}),
    "t5": (1, 0.3, {".q.": 0.5, ".k.": 0.5}),
    "t5_v1_1": (1, 0.2, {}),
    "bart": (1, 0.2, {"q_proj": 1.0, "k_proj": 1.0}),
}


def randomize(model: nn.Module, case: str) -> nn.Module:
    """Norm weights near one, biases small, routers wide (no near ties in top-k), the rest
    large enough that the logits spread and greedy choices are far apart."""
    seed, std, own = WEIGHTS.get(case, (0, 0.2, {}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            chosen = [v for part, v in own.items() if part in name]
            if chosen:
                p.copy_(chosen[0] * noise)
            elif ("norm" in name or "ln_" in name or "LayerNorm" in name) and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("mlp.gate.weight"):  # MoE routers
                p.copy_(noise)
            elif "relative_attention_bias" in name:
                p.copy_(0.5 * noise)
            elif name.endswith("bias"):
                p.copy_(0.02 * noise)
            else:
                p.copy_(std * noise)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias") or name.endswith("final_logits_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Models this small decode fastest on one thread; on a shared machine, a second one
    spinning for its share of every tiny product makes the file several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_MODELS: dict[str, tuple[nn.Module, nn.Module]] = {}


def models(case: str, tmp_path_factory) -> tuple[nn.Module, nn.Module]:
    """(transformers' model, ours converted from the folder it saves), built once per case."""
    if case not in _MODELS:
        config, cls = CONFIGS[case]()
        config._attn_implementation = "eager"
        config._experts_implementation = "eager"
        torch.manual_seed(0)
        hf = cls(config)
        if case == "t5_v1_1":  # transformers 5 ties every T5 head; a Flan-T5 checkpoint has one of its own
            hf.lm_head.weight = nn.Parameter(torch.empty(config.vocab_size, config.d_model))
        hf = randomize(hf, case)
        folder = tmp_path_factory.mktemp(case)
        hf.save_pretrained(folder)
        _, ours = from_hf(folder)
        _MODELS[case] = hf, ours.eval()
    return _MODELS[case]


def hf_generate(hf, ids, attention_mask=None, eos=NEVER):
    """transformers' greedy decoding of NEW tokens, and the raw logits of each step."""
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids) if attention_mask is None else attention_mask,
                          max_new_tokens=NEW, do_sample=False, eos_token_id=eos, pad_token_id=0,
                          forced_bos_token_id=None, forced_eos_token_id=None, return_dict_in_generate=True,
                          output_logits=True)
    return out.sequences, torch.stack(out.logits, dim=1)


def least_margin(logits: torch.Tensor) -> float:
    top = logits.float().topk(2, dim=-1).values
    return (top[..., 0] - top[..., 1]).min().item()


def assert_same(ours: torch.Tensor, theirs: torch.Tensor, logits: torch.Tensor) -> None:
    """Token for token, on a path whose choices are clear and not a few tokens repeated."""
    assert least_margin(logits) > MARGIN, "greedy choices too close to call: scale the weights"
    distinct = [row.unique().numel() for row in theirs[:, -NEW:]]
    assert min(distinct) >= 4, f"a row repeating one to three tokens proves little: {distinct}"
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    for row, (a, b) in enumerate(zip(ours.tolist(), theirs.tolist())):
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        assert first is None, f"row {row} differs from token {first}: ours {a[first:]}, theirs {b[first:]}"


def left_padded(rows: list[torch.Tensor], fill: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of prompts of different lengths, left-padded, and its attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), fill, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    return ids, mask


#: Two prompts of 12 and 8 tokens (mistral's window of 8: one prompt exceeds it, the other fills it).
PADDED, PADDED_MASK = left_padded([PROMPT[0], PROMPT[1, :8]])


# ------------------------------------------------------------------ decoder-only


@pytest.mark.parametrize("case", DECODERS)
def test_greedy_equals_transformers(case, tmp_path_factory):
    hf, ours = models(case, tmp_path_factory)
    theirs, logits = hf_generate(hf, PROMPT)
    mine = lc.generate(ours, PROMPT, NEW, eos_token_id=NEVER)
    assert torch.equal(mine[:, :PROMPT.shape[1]], PROMPT)
    assert_same(mine, theirs, logits)


@pytest.mark.parametrize("case", DECODERS)
def test_left_padded_batch_equals_transformers(case, tmp_path_factory):
    """transformers counts each row's positions from its mask, as we do from its padding."""
    hf, ours = models(case, tmp_path_factory)
    theirs, logits = hf_generate(hf, PADDED, PADDED_MASK)
    mine = lc.generate(ours, PADDED, NEW, attention_mask=PADDED_MASK, eos_token_id=NEVER)
    assert_same(mine, theirs, logits)
    # ... and the short row is the one it would be alone.
    alone = lc.generate(ours, PROMPT[1:, :8], NEW, eos_token_id=NEVER)
    assert torch.equal(mine[1, -NEW - 8:], alone[0])


@pytest.mark.parametrize("length", [1, 3])
@pytest.mark.parametrize("case", ["gpt2", "llama", "mistral", "deepseek_v3"])
def test_short_prompts_equal_transformers(case, length, tmp_path_factory):
    """A one-token prefill (the decode step's own shape), and a prompt shorter than mistral's
    window, which decoding then crosses: the rolling buffer filled a token at a time."""
    hf, ours = models(case, tmp_path_factory)
    ids = PROMPT[:, :length]
    theirs, logits = hf_generate(hf, ids)
    assert_same(lc.generate(ours, ids, NEW, eos_token_id=NEVER), theirs, logits)


def test_rows_stop_at_their_end_token_as_transformers_does(tmp_path_factory):
    """An end token that one row emits early: that row is padded after it, the other goes on."""
    hf, ours = models("llama", tmp_path_factory)
    free, _ = hf_generate(hf, PROMPT)
    first, second = free[0, PROMPT.shape[1]:].tolist(), free[1, PROMPT.shape[1]:].tolist()
    # Row 0's first new token from the fourth on that it has not emitted before and row 1 never emits.
    stop = next(i for i in range(3, NEW) if first[i] not in first[:i] and first[i] not in second)
    theirs, logits = hf_generate(hf, PROMPT, eos=first[stop])
    mine = lc.generate(ours, PROMPT, NEW, eos_token_id=first[stop], pad_token_id=0)
    assert theirs.shape[1] == PROMPT.shape[1] + NEW  # row 1 went on
    assert (theirs[0, PROMPT.shape[1] + stop + 1:] == 0).all()  # row 0 padded after its end token
    assert_same(mine, theirs, logits)


@pytest.mark.slow
def test_compiled_greedy_equals_transformers(tmp_path_factory):
    """The compiled prefill and decode step (prompts bucketed, buffers preallocated): the same tokens."""
    hf, ours = models("llama", tmp_path_factory)
    theirs, logits = hf_generate(hf, PADDED, PADDED_MASK)
    mine = lc.generate(ours, PADDED, NEW, attention_mask=PADDED_MASK, eos_token_id=NEVER, compile=True)
    assert_same(mine, theirs, logits)
    theirs, logits = hf_generate(hf, PROMPT)
    assert_same(lc.generate(ours, PROMPT, NEW, eos_token_id=NEVER, compile=True), theirs, logits)


# ------------------------------------------------------------------ encoder-decoders


@pytest.mark.parametrize("case", SEQ2SEQ)
def test_seq2seq_greedy_equals_transformers(case, tmp_path_factory):
    """From the decoder start token, over the source's keys and values computed once."""
    hf, ours = models(case, tmp_path_factory)
    theirs, logits = hf_generate(hf, PROMPT)
    mine = lc.generate(ours, PROMPT, NEW, eos_token_id=NEVER)
    assert (mine[:, 0] == hf.config.decoder_start_token_id).all()
    assert_same(mine, theirs, logits)


@pytest.mark.parametrize("case", SEQ2SEQ)
def test_seq2seq_left_padded_sources(case, tmp_path_factory):
    """A left-padded batch of sources decodes each row as transformers decodes it alone, and
    for T5 as transformers decodes the padded batch. (transformers' BART counts encoder
    positions from the first column, padding included, so its own padded batch is not the
    rows alone; ours counts from each row's first token.)"""
    hf, ours = models(case, tmp_path_factory)
    mine = lc.generate(ours, PADDED, NEW, attention_mask=PADDED_MASK, eos_token_id=NEVER)
    for row, source in enumerate((PROMPT[0:1], PROMPT[1:, :8])):
        theirs, logits = hf_generate(hf, source)
        assert_same(mine[row:row + 1], theirs, logits)
    if case.startswith("t5"):  # relative positions: transformers' padded batch is the rows alone too
        theirs, logits = hf_generate(hf, PADDED, PADDED_MASK)
        assert_same(mine, theirs, logits)


# ------------------------------------------------------------------ encoder-only


MASK_ID = 2  # [MASK]: a special id, never in PROMPT


def test_fill_mask_equals_transformers_argmax(tmp_path_factory):
    hf, ours = models("bert", tmp_path_factory)
    ids = PROMPT.clone()
    masked = torch.zeros_like(ids, dtype=torch.bool)
    masked[0, [1, 4, 9]] = masked[1, [0, 5, 6, 11]] = True
    ids[masked] = MASK_ID
    with torch.no_grad():
        logits = hf(ids).logits
    filled = lc.fill_mask(ours, ids, MASK_ID)
    assert least_margin(logits[masked]) > MARGIN
    assert torch.equal(filled[~masked], ids[~masked])
    assert torch.equal(filled[masked], logits.argmax(-1)[masked])
    assert filled[masked].unique().numel() >= 4, filled[masked]  # not one token everywhere


def test_fill_mask_left_padded_batch_equals_each_row_alone(tmp_path_factory):
    """BERT's positions count from the first column in transformers, padding included; ours
    from each row's first token: a padded row fills as transformers fills it unpadded."""
    hf, ours = models("bert", tmp_path_factory)
    rows = [PROMPT[0].clone(), PROMPT[1, :8].clone()]
    rows[0][[2, 8]] = MASK_ID
    rows[1][[0, 3]] = MASK_ID
    ids, mask = left_padded(rows)
    filled = lc.fill_mask(ours, ids, MASK_ID, attention_mask=mask)
    for row, alone in enumerate(rows):
        with torch.no_grad():
            logits = hf(alone[None]).logits[0]
        where = alone == MASK_ID
        assert least_margin(logits[where]) > MARGIN
        expected = torch.where(where, logits.argmax(-1), alone)
        assert torch.equal(filled[row, ids.shape[1] - len(alone):], expected)
