"""d3LLM multi-block decoding: the released rule (a one-row transliteration written here from the
pseudo-code), its reduction to block-by-block entropy decoding, early stop, batching, options;
the KV-cache variant: a one-row transliteration of the released cache loop, the schedule worked
out by hand, never caching == no cache, batched == alone.

The tiny random models are sharpened (lm_head x 60) so that entropies spread below the thresholds
and parallel, multi-block commits really happen (asserted); Dream gets an end-token bias so that
rows end early and the early stop is exercised.
"""

import dataclasses

import pytest
import torch
from transformers import DynamicCache

from d2f.decoding import DecodeConfig, generate
from d2f.decoding.config import BlockState, parse_options
from d2f.decoding.d3llm import D3LLMOptions, Pass, plan_cache, skipped_blocks
from d2f.family import family_of
from d2f.mask import to_additive
from d2f.models import load_model
from tests.decode_helpers import Counter, random_prompts

BS, G = 8, 32


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from d2f.tiny import write_tiny_checkpoint

    made = {}
    for fam in ("llada", "dream"):
        model, _ = load_model(write_tiny_checkpoint(tmp_path_factory.mktemp(fam), fam))
        with torch.no_grad():
            model.lm_head.weight.mul_(60.0)
            end = family_of(model).end_token_ids[0]
            bias = {"llada": 0.0, "dream": 0.05}[fam]
            model.lm_head.weight[end] += bias * model.lm_head.weight.std() * 60
        made[fam] = model
    return made


def _logits(model, fam, x):
    """Aligned logits (L, V) of one full bidirectional forward over the 1-D sequence x."""
    L = x.shape[0]
    attn = to_additive(torch.ones(1, L, L, dtype=torch.bool))
    out = model(input_ids=x[None], attention_mask=attn, position_ids=torch.arange(L)[None])
    return fam.align_logits(out.logits)[0].double()


def _entropy_and_argmax(logits, mask_id):
    p = logits.softmax(-1)
    H = -(p * (p + 1e-12).log()).sum(-1)
    x0 = logits.clone()
    x0[:, mask_id] = float("-inf")  # d2f never predicts the mask id
    return H, x0.argmax(-1)


def _cut(answer, ends):
    out = []
    for t in answer:
        if t in ends:
            break
        out.append(t)
    return out


@torch.no_grad()
def ref_d3llm(model, prompt, thr, add, act, rule, early_stop):
    """One row of d3LLM's generate_multi_block, written from its pseudo-code with a dict of
    block states and Python loops. Returns (answer cut before the first end, forwards)."""
    fam = family_of(model)
    mask, ends = fam.mask_token_id, set(fam.end_token_ids)
    P, NB = len(prompt), G // BS
    x = torch.tensor(prompt + [mask] * G)

    def progress(b):
        return 1.0 if b < 0 else float((x[P + b * BS : P + (b + 1) * BS] != mask).float().mean())

    full, created, forwards = {0: act <= 1.0}, 1, 0
    for _ in range(10_000):
        has_end = False
        if early_stop:
            found = [i for i in range(P, P + G) if int(x[i]) in ends]
            if found:
                x[found[0] + 1 :] = x[found[0]]
                has_end = True
        if not bool((x[P:] == mask).any()):
            break
        for b in range(created):
            if not full[b] and progress(b - 1) >= act:
                full[b] = True
        if created < NB and not has_end and progress(created - 1) >= add:
            full[created] = progress(created - 1) >= act
            created += 1
        H, x0 = _entropy_and_argmax(_logits(model, fam, x), mask)
        forwards += 1
        elig = [i for i in range(P, P + created * BS) if int(x[i]) == mask]
        sel = {i for i in elig if (H[i] <= thr if rule == "llada" else H[i] < thr)}
        if rule == "llada":
            sel.add(min(elig, key=lambda i: float(H[i])))
        for b in range(created):
            block = [i for i in elig if P + b * BS <= i < P + (b + 1) * BS]
            if full[b] and block:
                if not sel & set(block):
                    sel.add(min(block, key=lambda i: float(H[i])))
                break
        for i in sel:
            x[i] = x0[i]
    return _cut(x[P:].tolist(), ends), forwards


@torch.no_grad()
def ref_semi_ar_entropy(model, prompt, thr, rule):
    """Block-by-block entropy-threshold decoding (one block at a time, full forwards, no early
    stop): what d3LLM with add = activate = 1 must reduce to."""
    fam = family_of(model)
    mask, P = fam.mask_token_id, len(prompt)
    x = torch.tensor(prompt + [mask] * G)
    forwards = 0
    for k in range(G // BS):
        cols = range(P + k * BS, P + (k + 1) * BS)
        while any(int(x[i]) == mask for i in cols):
            H, x0 = _entropy_and_argmax(_logits(model, fam, x), mask)
            forwards += 1
            masked = [i for i in cols if int(x[i]) == mask]
            sel = [i for i in masked if (H[i] <= thr if rule == "llada" else H[i] < thr)]
            best = min(masked, key=lambda i: float(H[i]))
            for i in set(sel) | ({best} if rule == "llada" or not sel else set()):
                x[i] = x0[i]
    return _cut(x[P:].tolist(), set(fam.end_token_ids)), forwards


def _cfg(**kw):
    names = ("threshold", "early_stop", "rule", "cache_delay_iter", "refresh_interval")
    opts = {k: kw.pop(k) for k in names if k in kw}
    return DecodeConfig(strategy="d3llm", block_size=BS, max_new_tokens=G, options=opts, **kw)


def _parallel(out):
    """(most tokens committed in one step, steps that committed in two or more blocks)."""
    most = max(int(e.committed.sum(1).max()) for e in out.trace)
    multi = sum(
        int((e.committed.view(len(e.rows), -1, BS).any(-1).sum(-1) >= 2).any()) for e in out.trace
    )
    return most, multi


CASES = [  # (threshold, tau_add, tau_act, early_stop)
    (1.0, 0.1, 0.95, True),  # the authors' block settings
    (0.5, 0.25, 0.5, True),
    (0.8, 0.1, 0.95, False),
]


@pytest.mark.parametrize("fam", ["llada", "dream"])
@pytest.mark.parametrize("case", CASES)
def test_matches_released_rule(models, fam, case):
    thr, add, act, stop = case
    model = models[fam]
    cfg = _cfg(threshold=thr, early_stop=stop, tau_add=add, tau_act=act)
    most = multi = 0
    for p in random_prompts():
        out = generate(model, [p], cfg, record=True)
        want, forwards = ref_d3llm(model, p, thr, add, act, fam, stop)
        assert out.tokens[0] == want
        assert out.stats.forwards == forwards
        m, k = _parallel(out)
        most, multi = max(most, m), multi + k
    assert most >= 3 and multi >= 1  # parallel commits, and in several blocks at once


@pytest.mark.parametrize("fam", ["llada", "dream"])
@pytest.mark.parametrize("thr", [1.5, 2.0])
def test_add_activate_one_is_block_by_block_entropy(models, fam, thr):
    model = models[fam]
    cfg = _cfg(threshold=thr, early_stop=False, tau_add=1.0, tau_act=1.0)
    for p in random_prompts():
        out = generate(model, [p], cfg)
        want, forwards = ref_semi_ar_entropy(model, p, thr, fam)
        assert (out.tokens[0], out.stats.forwards) == (want, forwards)
        assert forwards < G  # entropy thresholds commit several tokens per forward


def test_rule_option_overrides_the_family(models):
    model = models["llada"]
    p = random_prompts()[0]
    out = generate(model, [p], _cfg(threshold=1.0, rule="dream"))
    assert (out.tokens[0], out.stats.forwards) == ref_d3llm(model, p, 1.0, 0.1, 0.95, "dream", True)
    llada = generate(model, [p], _cfg(threshold=1.0))
    assert llada.stats.forwards != out.stats.forwards  # the rules differ on this model


def test_early_stop_saves_forwards(models):
    model = models["dream"]
    cfg = _cfg(threshold=1.0)
    with_stop = generate(model, random_prompts(), cfg)
    without = generate(
        model, random_prompts(), dataclasses.replace(cfg, options={"early_stop": False})
    )
    ended = [r.hit_end for r in with_stop.stats.rows]
    assert any(ended)  # the end bias makes rows end: the early stop is exercised
    for r_stop, r_full in zip(with_stop.stats.rows, without.stats.rows, strict=True):
        assert r_stop.forwards <= r_full.forwards
    assert sum(r.forwards for r in with_stop.stats.rows) < sum(
        r.forwards for r in without.stats.rows
    )


@pytest.mark.parametrize("fam", ["llada", "dream"])
def test_batch_equals_alone_and_finished_rows_stop(models, fam):
    model = models[fam]
    prompts = random_prompts((5, 9, 3, 12), seed=1)
    cfg = _cfg(threshold=1.0)
    counter = Counter(model)
    try:
        alone = []
        for p in prompts:
            counter.calls = 0
            out = generate(model, [p], cfg)
            assert counter.calls == out.stats.forwards
            alone.append(out)
        counter.calls = 0
        batched = generate(model, prompts, cfg)
        calls = counter.calls
    finally:
        counter.handle.remove()
    assert batched.tokens == [a.tokens[0] for a in alone]
    per_row = [a.stats.forwards for a in alone]
    assert [r.forwards for r in batched.stats.rows] == per_row
    assert len(set(per_row)) > 1  # rows finish at different steps
    assert calls == batched.stats.forwards == max(per_row)  # one call per step for all rows


def test_options_validated():
    assert DecodeConfig(strategy="d3llm").options == D3LLMOptions(0.5, True, "family", 10**4, 10**4)
    for bad in ({"cache_delay_iter": -1}, {"refresh_interval": 0}, {"cache_delay_iter": True}):
        with pytest.raises(ValueError, match="must be an integer >="):
            DecodeConfig(strategy="d3llm", options=bad)
    assert parse_options("d3llm", ["cache_delay_iter=2", "refresh_interval=3"]) == {
        "cache_delay_iter": 2,
        "refresh_interval": 3,
    }
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
        DecodeConfig(strategy="d3llm", options={"threshold": -0.1})
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
        DecodeConfig(strategy="d3llm", options={"threshold": float("nan")})
    with pytest.raises(ValueError, match="rule must be family, llada or dream"):
        DecodeConfig(strategy="d3llm", options={"rule": "sdar"})
    with pytest.raises(TypeError, match="early_stop must be True or False"):
        DecodeConfig(strategy="d3llm", options={"early_stop": "yes"})
    with pytest.raises(ValueError, match=r"unknown d3llm options \['thresh'\]"):
        DecodeConfig(strategy="d3llm", options={"thresh": 0.4})
    got = parse_options("d3llm", ["threshold=0.4", "early_stop=false", "rule=dream"])
    assert got == {"threshold": 0.4, "early_stop": False, "rule": "dream"}
    with pytest.raises(ValueError, match="one of"):
        parse_options("d3llm", ["rule=sdar"])


# ---------------------------------------------------------------- the KV-cache variant


class Lengths:
    """Input lengths of every model call, seen by a forward pre-hook."""

    def __init__(self, model):
        self.seen = []
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.seen.append(kwargs["input_ids"].shape[1])


@pytest.fixture
def lengths(models):
    hooks = {fam: Lengths(m) for fam, m in models.items()}
    yield hooks
    for h in hooks.values():
        h.handle.remove()


@torch.no_grad()
def ref_d3llm_kv(model, prompt, thr, add, act, rule, delay, interval, early_stop=True):
    """One row of d3LLM's generate_multi_block_kv_cache (LLaDA) / _sample_multi_block_kv_cache
    (Dream), written from the released loop: dict block states, its scan, its four forward kinds
    over a DynamicCache. Two choices of d2f kept: the refresh keeps exactly the
    cached columns, and Dream's first fresh column is predicted from the last cached column's
    logits. Returns (answer cut before the first end, forwards, input length of each forward)."""
    fam = family_of(model)
    mask, ends = fam.mask_token_id, set(fam.end_token_ids)
    P, NB = len(prompt), G // BS
    L = P + G
    x = torch.tensor(prompt + [mask] * G)
    start = {0: 0, **{b: P + (b - 1) * BS for b in range(1, NB + 1)}}
    end = {0: P, **{b: P + b * BS for b in range(1, NB + 1)}}

    def masks(b):
        return int((x[start[b] : end[b]] == mask).sum())

    def progress(b):
        return 1.0 if b == 0 else 1 - masks(b) / BS

    full, created = {0: True, 1: act <= 1.0}, 2  # blocks 0 .. created - 1 exist
    done_at, is_cached = {0: 0}, {0: False}
    cache, cache_len, carry, lens = None, 0, None, []
    for t in range(1, 10_000):
        found = [i for i in range(P, L) if int(x[i]) in ends] if early_stop else []
        has_end = bool(found)
        if has_end:
            x[found[0] + 1 :] = x[found[0]]
            while created <= NB:  # the released code creates the rest as complete and cached
                done_at[created], is_cached[created] = t, True
                full[created] = True
                created += 1
            if rule == "dream":
                for b in range(1, NB + 1):
                    if start[b] > found[0]:
                        is_cached[b] = True
                        done_at.setdefault(b, t)
        if not bool((x[P:] == mask).any()):
            break
        for b in range(1, created):
            if not full[b] and progress(b - 1) >= act:
                full[b] = True
        if created <= NB and not has_end and progress(created - 1) >= add:
            full[created] = progress(created - 1) >= act
            created += 1
        # the scan
        to_cache = []
        for b in range(created):
            if end[b] <= cache_len:
                continue
            if masks(b) > 0:
                break
            done_at.setdefault(b, t)
            waited = t - done_at[b]
            if waited >= delay and not is_cached.get(b, False):
                to_cache.append(b)
                is_cached[b] = True
            elif waited < delay and rule == "llada":
                break
        update = end[max(to_cache)] - cache_len if to_cache else 0
        waiting = any(
            masks(b) == 0 and b in done_at and not is_cached.get(b, False) for b in range(created)
        )
        if update > 0 or (cache is not None and not waiting and t % interval != 0):
            cache = DynamicCache(config=model.config) if cache is None else cache
            n = L - cache_len
            out = model(
                input_ids=x[cache_len:][None],
                attention_mask=to_additive(torch.ones(1, n, L, dtype=torch.bool)),
                position_ids=torch.arange(cache_len, L)[None],
                cache=cache,
                use_cache=True,
            ).logits
            keep = cache_len + update
            cache.crop(-(L - keep))
            window = fam.align_logits(out, carry)[0]
            if update > 0 and fam.shift_logits:
                carry = out[:, keep - 1 - cache_len]
            first_col, cache_len = cache_len, keep
        else:
            refresh = cache is not None
            cache = DynamicCache(config=model.config) if refresh else None
            out = model(
                input_ids=x[None],
                attention_mask=to_additive(torch.ones(1, L, L, dtype=torch.bool)),
                position_ids=torch.arange(L)[None],
                cache=cache,
                use_cache=refresh,
            ).logits
            if refresh:
                cache.crop(-(L - cache_len))
                if fam.shift_logits:
                    carry = out[:, cache_len - 1]
            window, first_col = fam.align_logits(out)[0], 0
        lens.append(L - first_col)
        H, x0 = _entropy_and_argmax(window.double(), mask)
        elig = [i for i in range(P, end[created - 1]) if int(x[i]) == mask]
        sel = {
            i
            for i in elig
            if (H[i - first_col] <= thr if rule == "llada" else H[i - first_col] < thr)
        }
        if rule == "llada":
            sel.add(min(elig, key=lambda i: float(H[i - first_col])))
        for b in range(1, created):
            block = [i for i in elig if start[b] <= i < end[b]]
            if full[b] and block:
                if not sel & set(block):
                    sel.add(min(block, key=lambda i: float(H[i - first_col])))
                break
        for i in sel:
            x[i] = x0[i - first_col]
    return _cut(x[P:].tolist(), ends), len(lens), lens


DREAM_THR = 0.15  # the sharpened tiny Dream is more confident: a lower threshold, longer decodes
KV_CASES = [  # (threshold, tau_add, tau_act, cache_delay_iter, refresh_interval, early_stop)
    (0.8, 0.1, 0.95, 2, 3, True),  # the authors' LLaDA cache settings
    (0.8, 0.25, 0.5, 1, 10**4, False),  # Dream's GSM8K cache settings
    (0.5, 0.1, 0.95, 0, 2, False),
]


@pytest.mark.parametrize("fam", ["llada", "dream"])
@pytest.mark.parametrize("case", KV_CASES)
def test_kv_matches_released_loop(models, lengths, fam, case):
    thr, add, act, delay, interval, stop = case
    thr *= DREAM_THR if fam == "dream" else 1.0
    model = models[fam]
    cfg = _cfg(
        threshold=thr, tau_add=add, tau_act=act, early_stop=stop, cache_delay_iter=delay,
        refresh_interval=interval,
    )  # fmt: skip
    windows = []
    for p in random_prompts():
        want, forwards, want_lens = ref_d3llm_kv(
            model, p, thr, add, act, fam, delay, interval, stop
        )
        lengths[fam].seen.clear()
        out = generate(model, [p], cfg)
        assert (out.tokens[0], out.stats.forwards) == (want, forwards)
        assert lengths[fam].seen == want_lens
        windows += want_lens
    assert G in windows  # the prompt was cached
    assert stop or min(windows) < G  # and answer blocks (early stop: Dream's rows end soon)


@pytest.mark.parametrize("fam", ["llada", "dream"])
def test_kv_schedule_worked_by_hand(models, lengths, fam):
    """Blocks of 4, 16 tokens, one block at a time (add = activate = 1), threshold 0 (one token
    per step, asserted): block k completes in forward 4k. With delay 2 and refresh every 3rd:
      1: FULL (prompt waiting since forward 0)  2: APPEND prompt (x[0:], cache -> P)
      3: REFRESH (3 % 3)  4: CACHED x[P:]  5, 6: REFRESH (block 1 waiting)
      7: APPEND block 1 (x[P:], cache -> P + 4)  8: CACHED x[P+4:]  9, 10: REFRESH (block 2)
      11: APPEND block 2 (x[P+4:])  12: REFRESH (12 % 3)  13, 14: REFRESH (block 3)
      15: APPEND block 3 (x[P+8:])  16: CACHED x[P+12:]"""
    model, p = models[fam], random_prompts()[0]
    cfg = DecodeConfig(
        strategy="d3llm", block_size=4, max_new_tokens=16, tau_add=1.0, tau_act=1.0,
        options={"threshold": 0.0, "early_stop": False, "cache_delay_iter": 2,
                 "refresh_interval": 3},
    )  # fmt: skip
    out = generate(model, [p], cfg, record=True)
    assert [int(e.committed.sum()) for e in out.trace] == [1] * 16
    L = len(p) + 16
    assert lengths[fam].seen == [L, L, L, 16, L, L, 16, 12, L, L, 12, L, L, L, 8, 4]


@pytest.mark.parametrize("fam", ["llada", "dream"])
@pytest.mark.parametrize("interval", [1, 3, 10**4])
def test_never_caching_is_the_no_cache_decoder(models, lengths, fam, interval):
    model, prompts = models[fam], random_prompts()
    plain = generate(model, prompts, _cfg(threshold=0.8))
    lengths[fam].seen.clear()
    kv = generate(model, prompts, _cfg(threshold=0.8, refresh_interval=interval))
    assert kv.tokens == plain.tokens
    assert [r.forwards for r in kv.stats.rows] == [r.forwards for r in plain.stats.rows]
    assert set(lengths[fam].seen) == {max(map(len, prompts)) + G}


@pytest.mark.parametrize("fam", ["llada", "dream"])
@pytest.mark.parametrize("delay, interval", [(2, 3), (1, 10**4)])
def test_kv_batch_equals_alone(models, lengths, fam, delay, interval):
    """Ragged rows complete blocks at different steps, so one call mixes FULL / REFRESH / CACHED
    / APPEND rows: each row still gets its alone tokens and forwards, and the call feeds the
    longest window any row needs."""
    model, prompts = models[fam], random_prompts((5, 9, 3, 12), seed=1)
    thr = 0.8 * (DREAM_THR if fam == "dream" else 1.0)
    cfg = _cfg(
        threshold=thr, early_stop=False, cache_delay_iter=delay, refresh_interval=interval
    )  # no early stop: Dream's end bias would end every row within a few forwards
    alone, windows = [], []
    for p in prompts:
        lengths[fam].seen.clear()
        alone.append(generate(model, [p], cfg))
        # in the batch's columns: a full forward covers the padded prompt too
        windows.append([G + 12 if n == len(p) + G else n for n in lengths[fam].seen])
    lengths[fam].seen.clear()
    batched = generate(model, prompts, cfg)
    assert batched.tokens == [a.tokens[0] for a in alone]
    assert [r.forwards for r in batched.stats.rows] == [a.stats.forwards for a in alone]
    steps = range(max(map(len, windows)))
    want = [max(w[t] for w in windows if t < len(w)) for t in steps]
    assert lengths[fam].seen == want
    mixed = [len({w[t] for w in windows if t < len(w)}) > 1 for t in steps]
    assert any(mixed)  # rows wanted different windows in the same call


def test_plan_cache_scans():
    """One row, blocks [prompt, 1, 2, 3], the prompt cached; block 1 completed at forward 4,
    block 2 is complete too (first seen now, forward 5), block 3 has masks; delay 2."""
    done = torch.tensor([[True, True, True, False]])
    done_at = torch.tensor([[0, 4, -1, -1]])
    n_cached, skip = torch.tensor([1]), torch.zeros(1, 4, dtype=torch.bool)
    # LLaDA stops at waiting block 1: block 2's clock has not started; REFRESH (a block waits)
    at, n, branch = plan_cache(done, done_at, n_cached, skip, 5, 2, 10**4, "llada")
    assert (at.tolist(), n.tolist(), branch.tolist()) == ([[0, 4, -1, -1]], [1], [Pass.REFRESH])
    # Dream walks on and starts block 2's clock now
    at, n, branch = plan_cache(done, done_at, n_cached, skip, 5, 2, 10**4, "dream")
    assert (at.tolist(), n.tolist(), branch.tolist()) == ([[0, 4, 5, -1]], [1], [Pass.REFRESH])
    # forward 6: block 1 has waited 2 -> APPEND it; LLaDA starts block 2's clock only now
    at, n, branch = plan_cache(done, done_at, n_cached, skip, 6, 2, 10**4, "llada")
    assert (at.tolist(), n.tolist(), branch.tolist()) == ([[0, 4, 6, -1]], [2], [Pass.APPEND])
    # forward 7, Dream (block 2 seen at 5): both wait >= 2 -> blocks 1 and 2 appended together
    at, n, branch = plan_cache(
        done, torch.tensor([[0, 4, 5, -1]]), n_cached, skip, 7, 2, 10**4, "dream"
    )
    assert (n.tolist(), branch.tolist()) == ([3], [Pass.APPEND])
    # nothing waiting, cache held: CACHED, except on multiples of the refresh interval
    calm = torch.tensor([[True, False, False, False]])
    for t, want in ((4, Pass.CACHED), (6, Pass.REFRESH)):
        _, _, branch = plan_cache(
            calm, torch.tensor([[0, -1, -1, -1]]), n_cached, skip, t, 2, 3, "llada"
        )
        assert branch.tolist() == [want]
    # no cache yet: FULL while the prompt waits; a skipped (after-the-end) block is never cached
    none = torch.tensor([0])
    _, n, branch = plan_cache(calm, torch.tensor([[0, -1, -1, -1]]), none, skip, 1, 2, 3, "llada")
    assert (n.tolist(), branch.tolist()) == ([0], [Pass.FULL])
    tail = torch.tensor([[False, False, True, True]])
    _, n, _ = plan_cache(
        torch.ones(1, 4, dtype=torch.bool),
        torch.tensor([[0, 1, 1, 1]]),
        n_cached,
        tail,
        9,
        2,
        10**4,
        "dream",
    )
    assert n.tolist() == [2]


def test_skipped_blocks_after_the_end_token():
    """Blocks of 4, 4 blocks; the first end token at answer column 5 (block 2); blocks 1-3 were
    added, block 4 was not (the early stop stops adding). LLaDA: only block 4 (the early stop
    creates it cached); Dream: every block starting after column 5, i.e. blocks 3 and 4."""
    F, S, A = BlockState.FULL, BlockState.SEMI, BlockState.ABSENT
    state = torch.tensor([[F, F, S, A]], dtype=torch.int8)
    first = torch.tensor([5])
    assert skipped_blocks(state, first, 4, "llada").tolist() == [[False, False, False, False, True]]
    assert skipped_blocks(state, first, 4, "dream").tolist() == [[False, False, False, True, True]]
    no_end = torch.tensor([16])
    assert skipped_blocks(state, no_end, 4, "dream").tolist() == [[False] * 4 + [True]]
    assert skipped_blocks(state, None, 4, "dream").tolist() == [[False] * 4 + [True]]


def test_kv_one_host_sync_per_step(models, monkeypatch):
    model, prompts = models["llada"], random_prompts()
    cfg = _cfg(threshold=0.8, cache_delay_iter=1, refresh_interval=3)
    count = {"n": 0}
    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "nonzero"):
        orig = getattr(torch.Tensor, name)

        def wrapped(self, *a, _orig=orig, **k):
            count["n"] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    from d2f.decoding.common import Recorder
    from d2f.decoding.d3llm import d3llm_decode

    rec = Recorder(len(prompts), cfg.gen_length, "cpu")
    d3llm_decode(model, prompts, cfg, family_of(model), rec)
    monkeypatch.undo()
    assert 0 < count["n"] <= rec.step + 1, (count["n"], rec.step)


def test_entropy_counts_the_mask_token_as_released():
    """d3LLM's entropy is over the full softmax, the mask id included (the released code). The
    shared `predict` used to set the mask id's logit to -inf IN PLACE, so the entropy computed
    after it silently left the mask out (found side by side with the released code)."""
    from d2f.decoding import DecodeConfig
    from d2f.decoding.common import predict
    from d2f.decoding.d3llm import entropy

    logits = torch.tensor([[[2.0, 1.0, 3.0, 0.5]]])  # mask id 2 is the most likely token
    before = logits.clone()
    x0 = predict(logits, DecodeConfig(), mask_id=2)[0]
    assert x0.item() == 0  # the mask id is never predicted ...
    assert torch.equal(logits, before)  # ... and the caller's logits are left alone
    p = before.double().softmax(-1)
    assert torch.allclose(entropy(logits), -(p * (p + 1e-12).log()).sum(-1))
