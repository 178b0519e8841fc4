"""d3LLM multi-block decoding: the released rule (a one-row transliteration written here from the
pseudo-code), its reduction to block-by-block entropy decoding, early stop, batching, options.

The tiny random models are sharpened (lm_head x 60) so that entropies spread below the thresholds
and parallel, multi-block commits really happen (asserted); Dream gets an end-token bias so that
rows end early and the early stop is exercised.
"""

import dataclasses

import pytest
import torch

from d2f.decoding import DecodeConfig, generate
from d2f.decoding.config import parse_options
from d2f.decoding.d3llm import D3LLMOptions
from d2f.family import family_of
from d2f.mask import to_additive
from d2f.models import load_model
from tests.decode_helpers import Counter

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


def _prompts(n_list=(5, 9, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 100, (n,), generator=g).tolist() for n in n_list]


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
    opts = {k: kw.pop(k) for k in ("threshold", "early_stop", "rule") if k in kw}
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
    for p in _prompts():
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
    for p in _prompts():
        out = generate(model, [p], cfg)
        want, forwards = ref_semi_ar_entropy(model, p, thr, fam)
        assert (out.tokens[0], out.stats.forwards) == (want, forwards)
        assert forwards < G  # entropy thresholds commit several tokens per forward


def test_rule_option_overrides_the_family(models):
    model = models["llada"]
    p = _prompts()[0]
    out = generate(model, [p], _cfg(threshold=1.0, rule="dream"))
    assert (out.tokens[0], out.stats.forwards) == ref_d3llm(model, p, 1.0, 0.1, 0.95, "dream", True)
    llada = generate(model, [p], _cfg(threshold=1.0))
    assert llada.stats.forwards != out.stats.forwards  # the rules differ on this model


def test_early_stop_saves_forwards(models):
    model = models["dream"]
    cfg = _cfg(threshold=1.0)
    with_stop = generate(model, _prompts(), cfg)
    without = generate(model, _prompts(), dataclasses.replace(cfg, options={"early_stop": False}))
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
    prompts = _prompts((5, 9, 3, 12), seed=1)
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
    assert DecodeConfig(strategy="d3llm").options == D3LLMOptions(0.5, True, "family")
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
