"""Jacobi decoding of causal models (Jacobi Forcing's inference side, arXiv 2512.14681): `jacobi`.

Greedy Jacobi decoding guesses a chunk of n tokens and iterates `q <- greedy(q)` until the chunk is
a fixed point; every iteration is ONE causal forward of the draft over the exact KV cache of the
committed tokens, and its output is greedy AR decoding's, token for token. With `g_i` the argmax at
draft position i (it predicts position i + 1) and `q_0` the known next token:

    acc   = 1 + #leading i with q_{i+1} == g_i      # q_0 is always right: >= 1 token per forward
    commit q[:acc]; keep their KV, drop the rest     # an end token in q[:acc] ends the row there
    q     = [g_{acc-1} | g_acc .. g_{L-2}]           # known next token + greedy continuation
    chunk done (n accepted): q = [g_{L-1} | n - 1 guesses]   # guesses: random ids of the row

On top of that, as released (`jacobi_forward_greedy_multiblock`; docs/decoding.md):

* multi-block: up to `blocks` chunks in flight; once the newest has accepted ceil(spawn_ratio n)
  tokens, a provisional block (a copy of the verified draft, padded to n) rides behind it in the
  same forward and accepts by the same rule, conditioned on the unverified draft; when the
  verified chunk is done, the earliest provisional block becomes its next draft with its first
  token replaced by the true next token, re-verified from scratch (what keeps it lossless);
* rejection recycling: on a rejection the verified draft's rejected greedy tail and the whole
  current sequence go into a pool of `pool_size` entries; every older entry that contains the
  known next token proposes its continuation from there as an extra draft row (batch rows over
  the repeated cache, one forward); the row with the longest acceptance wins (ties: the plain
  Jacobi draft).

Rows are independent: each keeps its own committed KV right-aligned in the shared cache (left
padding masked, like the prompt), its own drafts and pool, and leaves the batch when it ends, so
it decodes what it decodes alone. Every forward commits >= 1 token and the last token is taken
from the forward before it, so a row never takes more forwards than `ar`.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import DynamicCache

from d2f.decoding.common import Batch, Recorder, drop_finished, forward
from d2f.decoding.config import DecodeConfig, strategy_options
from d2f.family import Family
from d2f.mask import causal_mask, position_ids


@strategy_options("jacobi")
@dataclass(frozen=True)
class JacobiOptions:
    """Settings of `jacobi`; defaults are the authors' (README: n=64, K=2, pool_size=4, r=0.85)."""

    chunk: int = 64  # >= 1 tokens per Jacobi chunk (n): the draft iterated to its fixed point
    blocks: int = 2  # >= 1 chunks in flight (K): one verified + K - 1 provisional
    spawn_ratio: float = 0.85  # (0, 1] add a provisional chunk once the newest accepted this share
    pool_size: int = 4  # >= 0 past sequences kept for rejection recycling; < 3 = off (as released)
    draft_seed: int = 0  # seed of each row's random draft tokens (speed only, never the tokens)

    def __post_init__(self):
        for name in ("chunk", "blocks", "pool_size", "draft_seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"jacobi option {name} must be an int, got {value!r}")
        if self.chunk < 1 or self.blocks < 1 or self.pool_size < 0:
            raise ValueError(
                "jacobi options need chunk >= 1, blocks >= 1, pool_size >= 0; got "
                f"chunk={self.chunk}, blocks={self.blocks}, pool_size={self.pool_size}"
            )
        if not isinstance(self.spawn_ratio, int | float) or not 0.0 < self.spawn_ratio <= 1.0:
            raise ValueError(f"jacobi option spawn_ratio must be in (0, 1], got {self.spawn_ratio}")


@dataclass
class Provisional:
    """A chunk riding behind the verified one: its accepted prefix (conditioned on unverified
    drafts) and its draft tail; len(accepted) + len(tail) is the chunk's length."""

    accepted: list[int]
    tail: list[int]


@dataclass
class Row:
    """One prompt's decoding state (host side: Jacobi's accept decisions are per row)."""

    prompt: list[int]
    gen: torch.Generator  # the row's own draft-guess generator: batched == alone
    pool: deque  # rejection-recycling pool (maxlen = pool_size)
    answer: list[int] = field(default_factory=list)  # committed tokens (their KV is cached)
    drafts: list[list[int]] = field(default_factory=list)  # [plain Jacobi draft, candidates...]
    chunk_len: int = 0  # tokens of the current verified chunk
    chunk_acc: list[int] = field(default_factory=list)  # its tokens accepted so far
    provisional: list[Provisional] = field(default_factory=list)
    done: bool = False

    def guesses(self, k: int) -> list[int]:
        """k random draft tokens drawn from the row's own ids (prompt and answer), as released."""
        ids = self.prompt + self.answer
        idx = torch.randint(len(ids), (k,), generator=self.gen).tolist()
        return [ids[i] for i in idx]

    def window(self) -> list[list[int]]:
        """The forward's input rows: each draft followed by every provisional chunk."""
        behind = [t for p in self.provisional for t in p.accepted + p.tail]
        return [d + behind for d in self.drafts]


def accepted(draft: list[int], greedy: list[int]) -> int:
    """1 + the number of leading i with draft[i + 1] == greedy[i]: the verified prefix length."""
    n = 1
    while n < len(draft) and draft[n] == greedy[n - 1]:
        n += 1
    return n


def recycle(pool: deque, nxt: int, draft: list[int]) -> list[list[int]]:
    """Candidate drafts from every pool entry but the newest (newest first): the entry's suffix
    from its first `nxt`, cut to len(draft) or completed with draft's own tokens. As released,
    candidates are used only when there are at least two."""
    out = []
    for seq in reversed(list(pool)[:-1]):
        if nxt in seq:
            cand = seq[seq.index(nxt) :][: len(draft)]
            out.append(cand + draft[len(cand) :])
    return out if len(out) > 1 else []


def advance(row: Row, greedy: list[list[int]], opts: JacobiOptions, ends, pad: int, cap: int):
    """Apply one forward's greedy tokens (one list per draft row, over the window) to `row`.

    Returns (the chosen draft row, tokens committed). Commits the verified prefix (cut after an
    end token), updates the provisional chunks, recycles on a rejection, and on a finished chunk
    promotes the earliest provisional chunk (or starts a guessed one).
    """
    L = len(row.drafts[0])
    accs = [accepted(d, g) for d, g in zip(row.drafts, greedy, strict=True)]
    best = accs.index(max(accs))  # first maximum: the plain draft wins ties
    draft, g, acc = row.drafts[best], greedy[best], accs[best]
    end = next((i for i, t in enumerate(draft[:acc]) if t in ends), None)
    if end is not None:
        row.answer += draft[: end + 1]
        row.done = True
        return best, end + 1
    row.answer += draft[:acc]
    row.chunk_acc += draft[:acc]
    nxt = g[acc - 1]  # the known next token (g[L - 1] when the whole draft is accepted)
    if acc < L:
        row.drafts = [[nxt] + g[acc : L - 1]]
        if opts.pool_size:  # NOTE: before the provisional chunks move, as released
            whole = row.chunk_acc + row.window()[0]
            row.pool.append([t for t in whole if t != pad])
            if acc < L - 1:
                row.pool.append(g[acc : L - 1])  # the rejected greedy tail
            row.drafts += recycle(row.pool, nxt, row.drafts[0])
    off = L
    for p in row.provisional:  # conditioned on the chosen draft row (released: row 0)
        off += len(p.accepted)
        n, tail = len(p.tail), g[off : off + len(p.tail)]
        if n:
            k = accepted(p.tail, tail)
            p.accepted += p.tail[:k]
            p.tail = [tail[k - 1]] + tail[k : n - 1] if k < n else []
        off += n
    room = cap - len(row.answer)
    if acc == L and room <= 0:
        row.done = True
    elif acc == L:  # chunk done: promote the earliest provisional chunk, else guess a new one
        row.chunk_len, row.chunk_acc = min(opts.chunk, room), []
        if row.provisional:
            p = row.provisional.pop(0)
            row.drafts = [([nxt] + (p.accepted + p.tail)[1:])[: row.chunk_len]]
        else:
            row.drafts = [[nxt] + row.guesses(row.chunk_len - 1)]
    else:  # spawn behind the newest chunk when it has progressed enough and there is room
        newest = len(row.provisional[-1].accepted) if row.provisional else len(row.chunk_acc)
        start = len(row.answer) + L - acc + sum(len(p.accepted + p.tail) for p in row.provisional)
        fits = min(opts.chunk, cap - start)
        if (
            1 + len(row.provisional) < opts.blocks
            and newest >= math.ceil(opts.spawn_ratio * opts.chunk)
            and fits > 0
        ):
            tail = (row.drafts[0] + [pad] * opts.chunk)[:fits]
            row.provisional.append(Provisional([], tail))
    return best, acc


def settle(row: Row, ends, cap: int) -> None:
    """A row whose next token is known to be its last (an end token, or the last that fits)
    commits it without a forward; a row with no room left is done."""
    if row.done:
        return
    if len(row.answer) >= cap:
        row.done = True
    elif row.drafts[0][0] in ends or len(row.answer) + 1 == cap:
        row.answer.append(row.drafts[0][0])
        row.done = True


def keep_accepted(kv, T: int, chosen: Tensor, kept: Tensor, length: list[int]):
    """The cache after a forward: each row keeps its chosen draft row's first `kept` new columns.

    kv: per layer (keys, values) (N, H, T + W, D) after a forward over a W-column window, each
    row's committed KV right-aligned in the first T columns; chosen (B,) long, the draft row of
    each row; kept (B,) long; length: each row's committed tokens after (host ints, no sync).
    Returns kv (B, H, T', D) and its validity (B, T') bool, every row's committed KV right-aligned
    again, T' = max(length).
    """
    T2 = max(length)
    cols = torch.arange(T2, device=kept.device)
    src = ((T + kept - T2)[:, None] + cols[None]).clamp(min=0)  # (B, T') source column
    valid = cols[None] >= T2 - torch.tensor(length, device=kept.device)[:, None]
    out = []
    for k, v in kv:
        idx = src[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        out.append((k[chosen].gather(2, idx), v[chosen].gather(2, idx)))
    return out, valid


@torch.no_grad()
def jacobi_decode(model, prompts, cfg: DecodeConfig, family: Family, rec: Recorder) -> None:
    """Jacobi decoding of `prompts` (token id lists) into `rec` (see the module doc)."""
    if cfg.temperature > 0:
        raise ValueError("jacobi is lossless w.r.t. greedy AR decoding: use temperature 0")
    opts: JacobiOptions = cfg.options
    device = next(model.parameters()).device
    ends, pad, cap = set(family.end_token_ids), family.pad_token_id, cfg.max_new_tokens
    batch = Batch.create(prompts, cfg.gen_length, family.end_token_ids[0], pad, device)
    P = batch.prompt_len
    rows = [
        Row(list(p), torch.Generator().manual_seed(opts.draft_seed), deque(maxlen=opts.pool_size))
        for p in prompts
    ]

    # prefill: prompt + (n - 1) guesses; the greedy tokens from the last prompt column on are the
    # first draft (its first token is greedy AR's first); the guesses' KV is dropped (as released)
    first = min(opts.chunk, cap)
    guess = torch.tensor([r.guesses(first - 1) for r in rows], dtype=torch.long, device=device)
    x = torch.cat([batch.x[:, :P], guess.view(len(rows), first - 1)], 1)  # (B, P + n - 1)
    valid = torch.cat([batch.valid[:, :P], torch.ones_like(guess, dtype=torch.bool)], 1)
    sub = Batch(x, valid, position_ids(valid), batch.rows, P)
    cache = DynamicCache(config=model.config)
    logits = forward(model, rec, sub, causal_mask(valid), 0, x.shape[1], cache)
    for r, g in zip(rows, logits[:, P - 1 :].argmax(-1).tolist(), strict=True):
        r.drafts, r.chunk_len = [g], first
    kv = [(layer.keys[:, :, :P], layer.values[:, :, :P]) for layer in cache.layers]
    kv_valid = batch.valid[:, :P]  # (B, T) committed columns, right-aligned
    rec.prefill_done()

    while True:
        before = [len(r.answer) for r in rows]
        for r in rows:
            settle(r, ends, cap)
        _write_answers(batch, rows, P)
        if any(len(r.answer) > n for r, n in zip(rows, before, strict=True)):
            _emit(rec, batch, rows, before)  # last tokens known from the previous forward
        fin = [r.done for r in rows]
        if any(fin):
            keep = drop_finished(rec, batch, torch.tensor(fin, device=device), fin)
            if keep is None:
                break
            rows = [r for r in rows if not r.done]
            kv = [(k[keep], v[keep]) for k, v in kv]
            kv_valid = kv_valid[keep]
        windows = [r.window() for r in rows]
        owner = torch.tensor([b for b, w in enumerate(windows) for _ in w], device=device)
        flat = [d for w in windows for d in w]
        W = max(len(d) for d in flat)
        x = torch.tensor([d + [pad] * (W - len(d)) for d in flat], device=device)  # (N, W)
        start = kv_valid.sum(1)[owner]  # (N,) position of each row's next token
        pos = start[:, None] + torch.arange(W, device=device)[None]
        keys_valid = torch.cat([kv_valid[owner], torch.ones_like(x, dtype=torch.bool)], 1)
        T = kv_valid.shape[1]
        sub = Batch(x, keys_valid[:, T:], pos, batch.rows[owner], 0)
        cache = DynamicCache(
            ddp_cache_data=[(k[owner], v[owner]) for k, v in kv], config=model.config
        )
        logits = forward(model, rec, sub, causal_mask(keys_valid, T, T + W), 0, W, cache)
        greedy = logits.argmax(-1).tolist()  # (N, W) NOTE: the forward's one host sync

        chosen, kept, before = [], [], [len(r.answer) for r in rows]
        first_of = [0]
        for w in windows:
            first_of.append(first_of[-1] + len(w))
        for b, r in enumerate(rows):
            best, acc = advance(r, greedy[first_of[b] : first_of[b + 1]], opts, ends, pad, cap)
            chosen.append(first_of[b] + best)
            kept.append(acc)
        new_kv = [(layer.keys, layer.values) for layer in cache.layers]
        chosen, kept = torch.tensor(chosen, device=device), torch.tensor(kept, device=device)
        length = [len(r.prompt) + len(r.answer) for r in rows]
        kv, kv_valid = keep_accepted(new_kv, T, chosen, kept, length)
        _write_answers(batch, rows, P)
        _emit(rec, batch, rows, before)
    rec.close()


def _emit(rec: Recorder, batch: Batch, rows: list[Row], before: list[int]) -> None:
    """Record a step: the answer positions each row committed since `before` (its lengths)."""
    committed = torch.zeros_like(batch.answer, dtype=torch.bool)  # (B, G)
    for b, r in enumerate(rows):
        committed[b, before[b] : len(r.answer)] = True
    rec.emit(batch, committed)


def _write_answers(batch: Batch, rows: list[Row], P: int) -> None:
    """Copy the rows' committed tokens into the batch's answer columns."""
    for b, r in enumerate(rows):
        if r.answer:
            batch.x[b, P : P + len(r.answer)] = torch.tensor(r.answer, device=batch.x.device)
