"""One D2F step as a function of tensors: window forward, commit, and the next step's plan.

`d2f_step` is the whole body of a D2F step (`d2f.decoding.pipeline` runs the loop around it):

  1. the window's mask, a row gather of the decode's one block-causal table (the later blocks
     it hides include every block that does not exist yet);
  2. one model call over the window columns `cols` with that mask and the cache;
  3. the predictions and `common.commit` in the window's live blocks;
  4. the NEXT step's plan (`plan`): `update_blocks` on the new tokens, which rows are finished,
     how many leading blocks are complete (what the cache may keep) and how many exist (where
     the next window ends), packed in one tensor: the loop's one host read per step.

Everything the step needs is a tensor argument (the window is `cols`, a column index tensor, not
a slice), so the same function runs eagerly or under `torch.compile(fullgraph=True)`
(`DecodeConfig.compile`; gpt-fast's `decode_one_token` pattern): `fullgraph` makes a host sync
inside the step (`.item()`, `.tolist()`, a tensor in an `if`) an error instead of a silent graph
break, and with fixed shapes a GPU can capture it as a CUDA graph (`compile="reduce-overhead"`).
Shapes are fixed by padding the window on the right to a bucket (`window_buckets`): a whole
number of blocks, a power of two of them (or all of them), so a decode sees at most
log2(num_blocks) + 1 window shapes. The padding columns are invisible to every real query (they
do not exist as keys), are never committed, and are written to cache columns that are
overwritten before anything sees them, so the tokens are those of the unpadded eager step.

The first step (prompt + first block, the prompt's one call) is the same function with the
prompt's columns in front (`a_off`); compiled, its answer part is padded like any window, and
dynamo makes the lengths symbolic after the second one it sees (automatic dynamic shapes), so
new prompt lengths stop building graphs after the first few decodes (`scripts/bench_decode.py`
counts them: its `graphs` column).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from d2f.decoding.common import commit, end_mask, ended_rows, predict
from d2f.decoding.config import BlockState, DecodeConfig
from d2f.family import Family
from d2f.mask import to_additive

RECOMPILE_LIMIT = 64
_COMPILED: dict[str, object] = {}  # compile mode -> the compiled `d2f_step` (one per process)
# NOTE: plain ints, not the IntEnum members: an op on a tensor and an IntEnum costs about twice
# the op with an int (eager CPU), and torch.compile cannot trace the comparison with a member
ABSENT, SEMI, FULL = BlockState.ABSENT.value, BlockState.SEMI.value, BlockState.FULL.value


def window_buckets(num_blocks: int, block_size: int) -> list[int]:
    """Window widths (columns) a padded step may have: 1, 2, 4, ... blocks, and all of them."""
    n, out = 1, []
    while n < num_blocks:
        out.append(n * block_size)
        n *= 2
    return [*out, num_blocks * block_size]


def bucket(width: int, buckets: list[int]) -> int:
    """The smallest bucket >= width."""
    return next(b for b in buckets if b >= width)


def max_padding(buckets: list[int], block_size: int) -> int:
    """The most columns `bucket` adds to a whole-block window (the static cache's extra room)."""
    return max(bucket(w, buckets) - w for w in range(block_size, buckets[-1] + 1, block_size))


def decoded_fraction(answer: Tensor, mask_id: int, bs: int) -> Tensor:
    """(B, G) answer -> (B, NB) fraction of decoded tokens per block."""
    B, G = answer.shape
    return (answer != mask_id).view(B, G // bs, bs).float().mean(-1)


def update_blocks(state: Tensor, frac: Tensor, ended: Tensor, cfg: DecodeConfig) -> Tensor:
    """Append and activate blocks (`d2f.decoding.pipeline`'s step 1).

    state (B, NB) int8 `BlockState` codes, frac (B, NB) decoded fractions, ended (B,) bool (an
    end token is decoded: no block is added). Returns the new (B, NB) int8 state.
    """
    B, NB = state.shape
    n_exist = (state != ABSENT).sum(1)  # (B,)
    last = (n_exist - 1).clamp(min=0)[:, None]
    last_frac = torch.where(n_exist > 0, frac.gather(1, last)[:, 0], 1.0)  # prompt = decoded
    add = ~ended & (n_exist < NB) & (last_frac >= cfg.tau_add)  # (B,)
    # the first absent block (none when all exist); a comparison, not one_hot (its range checks)
    slot = (torch.arange(NB, device=state.device) == n_exist[:, None]) & add[:, None]  # (B, NB)
    state = torch.where(slot, SEMI, state)
    pred_frac = F.pad(frac[:, :-1], (1, 0), value=1.0)  # (B, NB): block 1 follows the prompt
    activate = (state == SEMI) & (pred_frac >= cfg.tau_act)
    return torch.where(activate, FULL, state).to(torch.int8)


def plan(
    answer: Tensor, state: Tensor, end_ids: Tensor, mask_id: int, cfg: DecodeConfig
) -> tuple[Tensor, Tensor]:
    """The start of a step, from the tokens so far: blocks updated, and what the loop must read.

    answer (B, G), state (B, NB) int8. Returns the new state and `sync` (B + 2,) long:
    `[finished (B,), keep_blocks, n_blocks]`, where a row is finished when an end token is
    decoded with nothing undecoded before it or all blocks exist and are complete,
    `keep_blocks` is the fewest leading complete blocks of an unfinished row (the cache keeps
    exactly those: their KV came from final tokens) and `n_blocks` the most existing blocks of
    an unfinished row (the window's end).
    """
    NB = state.shape[1]
    frac = decoded_fraction(answer, mask_id, cfg.block_size)  # (B, NB)
    state = update_blocks(state, frac, end_mask(answer, end_ids).any(1), cfg)
    exists = state != ABSENT
    complete = exists & (frac == 1.0)
    finished = ended_rows(answer, mask_id, end_ids) | complete.all(1)
    done_prefix = complete.int().cumprod(1).sum(1)  # leading complete blocks per row
    keep_blocks = torch.where(finished, NB, done_prefix).min()
    n_blocks = torch.where(finished, 0, exists.sum(1)).max()
    return state, torch.cat([finished.long(), torch.stack([keep_blocks, n_blocks]).long()])


def d2f_step(
    model,
    cache,
    x: Tensor,
    pos: Tensor,
    table: Tensor,
    key_block: Tensor,
    state: Tensor,
    carry: Tensor | None,
    cols: Tensor,
    n_keys: int | None,
    a_off: int,
    end_ids: Tensor,
    family: Family,
    cfg: DecodeConfig,
    generator: torch.Generator | None = None,
):
    """One D2F step (the module docstring's 1-4) over window columns `cols`.

    x, pos: (B, L) tokens (mask id where undecoded) and position ids of `[prompt | answer]`;
    table: (B, Lc, Lc) bool block-causal mask with every block existing (Lc >= L: padding room);
    key_block: (Lc,) long, each column's answer block (-1 on the prompt, NB past the answer);
    state: (B, NB) int8 `BlockState` codes of this step (after its `plan`); carry: (B, V) logits
    predicting the window's first column (shifted families after the first step) or None;
    cols: (W,) long, the window's columns, consecutive, from the cache's end; n_keys: the keys the
    model sees (cached + window; None = all Lc, a static cache); a_off: the window's first answer
    column's index in `cols` (the prompt's length in the first step, else 0).
    Returns logits (B, W, V), x (B, L) after the commit, the committed positions (B, W - a_off)
    bool, the next step's state and sync (`plan`), and whether every logit is finite (() bool).
    No host sync.
    """
    B, L = x.shape
    Lc, G = table.shape[-1], cfg.gen_length
    mask_id = family.mask_token_id
    # Block-causal alone hides every block that does not exist yet: they all follow the last
    # existing one, where the window ends (the compiled window's padding included), and a
    # stale static-cache column past the window is a later block too. Padding queries see
    # real keys, but nothing reads their outputs and their KV is overwritten before it is seen.
    mask = table.index_select(1, cols)[..., :n_keys]  # (B, W, K); the table keeps the diagonal
    # (B, Lc): the compiled window may run past the answer (Lc > L only then)
    xp = F.pad(x, (0, Lc - L), value=mask_id) if Lc > L else x
    ids = xp.index_select(1, cols)
    logits = model(
        input_ids=ids,
        attention_mask=to_additive(mask, next(model.parameters()).dtype),
        position_ids=(F.pad(pos, (0, Lc - L)) if Lc > L else pos).index_select(1, cols),
        cache=cache,
        use_cache=True,
    ).logits
    # before predict, which writes -inf into the mask id's column
    finite = torch.isfinite(logits).all()
    # (B, W - a_off, V) over the window's answer columns: column i predicts token i
    preds = family.align_logits(logits, carry)[:, a_off:]
    ans_cols, answer_w = cols[a_off:], ids[:, a_off:]
    window_blocks = key_block[ans_cols].view(-1, cfg.block_size)[:, 0]  # (W_a // bs,) NB = padding
    state_w = F.pad(state, (0, 1), value=ABSENT)[:, window_blocks]  # (B, W_a // bs)
    x0, conf, score = predict(preds, cfg, mask_id, generator)
    chosen = commit(answer_w, state_w, x0, conf, score, mask_id, cfg)
    # a new tensor, contiguous: a strided view would be one more guard for the next call
    x = xp.index_copy(1, ans_cols, torch.where(chosen, x0, answer_w))[:, :L].contiguous()
    next_state, sync = plan(x[:, L - G :], state, end_ids, mask_id, cfg)
    return logits, x, chosen, next_state, sync, finite


def step_function(mode: str):
    """`d2f_step` as `DecodeConfig.compile` asks: itself ("off"), dynamo only ("eager"), or
    inductor with `mode` ("default", "reduce-overhead"); always fullgraph."""
    if mode == "off":
        return d2f_step
    if mode not in _COMPILED:
        # NOTE: the limit counts every graph of `d2f_step` in the process (each model, config,
        # bucket and batch size); under fullgraph, going past it is an error, not a fallback
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
        config.accumulated_recompile_limit = max(
            config.accumulated_recompile_limit, RECOMPILE_LIMIT
        )
        if mode == "eager":
            _COMPILED[mode] = torch.compile(d2f_step, backend="eager", fullgraph=True)
        else:
            _COMPILED[mode] = torch.compile(d2f_step, mode=mode, fullgraph=True)
    return _COMPILED[mode]
