"""One literal, hand-worked D2F decode: two blocks of four, every step's commits written out.

The pipeline and the slow reference share `predict` and `d2f.mask`, so their agreement cannot catch a
bug in either. This test pins both against a trace worked out by hand from the paper's rules
(Sec. 3.3) and a fake model whose logits are a written-down function of what each query may see.
"""

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import LlamaConfig

from d2f.decoding import DecodeConfig, generate
from d2f.family import Family

MASK, END, VOCAB = 6, 0, 8  # tokens 1..5 are words, 7 is unused


class SeeingLM(nn.Module):
    """A fake dLLM: query q predicts token `1 + n % 5` with logit `4 + n - 2k`, all other tokens 0.

    n = decoded (non-mask) tokens among the keys q may attend (the additive mask says which; the
    keys are the cached prefix followed by the window), k = q's index inside its answer block
    (position - 3) % 4 for a 3-token prompt. The KV cache stores the token ids themselves, so a
    stale or wrongly cropped cache changes n.
    """

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # device and dtype for the decoders
        self.config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=4,
            intermediate_size=4,
            num_hidden_layers=1,
            num_attention_heads=1,
            num_key_value_heads=1,
            max_position_embeddings=64,
        )
        self.d2f_family = Family(
            name="llada",
            mask_token_id=MASK,
            end_token_ids=(END,),
            answer_end_token_id=END,
            pad_token_id=END,
            bos_token_id=None,
            shift_logits=False,
            lora_target_modules=(),
            use_chat_template=False,
        )
        self.forwards = 0
        self.shapes = []  # (window columns, key columns) of every call

    def forward(
        self, input_ids, attention_mask, position_ids, use_cache=False, cache=None, **old_name
    ):
        self.forwards += 1
        cache = old_name.get("past_key_values", cache)  # transformers < 5.24 spelled it so
        keys = input_ids.float()[:, None, :, None]  # (B, 1, W, 1): the "KV" is the token id
        if cache is not None:
            keys = cache.update(keys, keys, 0)[0]  # (B, 1, K, 1): cached prefix + window
        keys = keys[:, 0, :, 0].long()  # (B, K)
        visible = attention_mask[:, 0] == 0  # (B, W, K)
        self.shapes.append(tuple(visible.shape[1:]))
        n = (visible & (keys != MASK)[:, None, :]).sum(-1)  # (B, W)
        k = (position_ids - 3) % 4  # (B, W); prompt positions are never predicted
        logits = torch.zeros(*input_ids.shape, VOCAB)  # (B, W, V)
        logits.scatter_(-1, (1 + n % 5)[..., None], (4.0 + n - 2 * k)[..., None].float())
        return SimpleNamespace(logits=logits)


PROMPT = [1, 2, 3]  # positions 0-2; block 1 = positions 3-6, block 2 = positions 7-10
CFG = DecodeConfig(block_size=4, max_new_tokens=8, tau_add=0.5, tau_act=0.75, tau_conf=0.999)
WANT_TOKENS = [4, 5, 1, 2, 1, 3, 5, 1]
WANT_COMMITS = [[0], [1], [2, 4], [3, 5], [6], [7]]  # answer columns (position - 3) per step


def test_hand_worked_d2f_trace():
    """The trace, by hand. With s = n - 2k the target's probability is e^(4+s) / (e^(4+s) + 6):
    0.9980 at s = 4, 0.9993 at s = 5, so tau_conf = 0.999 commits exactly when s >= 5; a fully
    activated block that commits none takes its highest s (its earliest masked position).

    step 1: block 1 added and fully active (the prompt counts as decoded). No separate prefill:
      one call over the prompt and block 1, window 0-6 (the prompt's KV, 0-2, is cached). Block 1
      sees n = 3: s = 3, 1, -1, -3 -> none above; fallback position 3, token 1 + 3 % 5 = 4.
    step 2: block 1 is 1/4 decoded < tau_add: no block added. Window 3-6 over the cached 0-2.
      n = 4: s(4) = 2 -> fallback 4, token 5.
    step 3: 2/4 >= tau_add: block 2 added, semi-active (2/4 < tau_act). Window 3-10. Block 1: n = 5,
      s(5) = 1 -> fallback 5, token 1. Block 2 sees the prompt and block 1: n = 5, s(7) = 5 -> 7
      commits (token 1); s(8) = 3, s(9) = 1, s(10) = -1 do not; semi-active: no fallback.
    step 4: block 1 is 3/4 >= tau_act: block 2 fully active. Block 1 does NOT see block 2: n = 6,
      s(6) = 0 -> fallback 6, token 2 (a mask letting it see 7 would give token 3). Block 2:
      n = 7, s(8) = 5 commits (token 3), s(9) = 3 and s(10) = 1 do not.
    step 5: block 1 was complete at the step's start: this forward (window 3-10) caches 0-6.
      n = 9: s(9) = 5 commits (token 5), s(10) = 3 does not.
    step 6: window 7-10 over the cached 0-6 (the sliced mask). n = 10, s(10) = 4 -> fallback 10,
      token 1.
    step 7: every block complete: the row stops without a forward. Forwards: 6, one per step
    (a separate prefill would make 7); calls (window, keys): (7, 7), (4, 7), (8, 11) x 3, (4, 11).
    """
    model = SeeingLM()
    out = generate(model, [PROMPT], CFG, record=True)
    commits = [e.committed[0].nonzero()[:, 0].tolist() for e in out.trace]
    assert commits == WANT_COMMITS
    assert out.tokens == [WANT_TOKENS]
    assert out.stats.forwards == model.forwards == 6
    assert model.shapes == [(7, 7), (4, 7), (8, 11), (8, 11), (8, 11), (4, 11)]
    states = [e.block_state[0].tolist() for e in out.trace]
    assert states == [[2, 0], [2, 0], [2, 1], [2, 2], [2, 2], [2, 2]]


@pytest.mark.parametrize("strategy", ["reference", "cache_only"])
def test_hand_worked_trace_other_paths(strategy):
    """The full-recompute reference gives the same tokens in 6 forwards (no prefill). With
    tau_add = 1 (cache_only) block 2 waits for block 1: steps 1-4 commit positions 3, 4, 5, 6
    (fallbacks, n = 3..6, tokens 4, 5, 1, 2); block 2 then sees n = 7: s(7) = 7, s(8) = 5 commit
    (tokens 3, 3); next n = 9: s(9) = 5 commits (token 5); then n = 10, s(10) = 4: fallback (token
    1). 7 steps, the first over the prompt too = 7 forwards, as many as the reference's."""
    model = SeeingLM()
    out = generate(model, [PROMPT], CFG, strategy=strategy)
    if strategy == "reference":
        assert out.tokens == [WANT_TOKENS] and model.forwards == 6
    else:
        assert out.tokens == [[4, 5, 1, 2, 3, 3, 5, 1]] and model.forwards == 7


@pytest.mark.parametrize("strategy", ["d2f", "reference", "vanilla", "fast_dllm"])
def test_max_new_tokens_not_a_multiple_is_honoured(strategy):
    """6 tokens with blocks of 4: two blocks are decoded and the answer is cut to 6 (it used to
    be silently capped at one block, 4 tokens). For d2f these are the trace's first 6 tokens."""
    out = generate(SeeingLM(), [PROMPT], CFG, strategy=strategy, max_new_tokens=6)
    assert len(out.tokens[0]) == out.stats.rows[0].tokens == 6
    if strategy in ("d2f", "reference"):
        assert out.tokens == [WANT_TOKENS[:6]]
