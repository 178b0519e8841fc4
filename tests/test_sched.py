"""SchED (`sched`) and Prophet (`prophet`): the vanilla sampler with an early exit.

References, independent of the decoders: `vanilla` itself (whose path the exit rules never change
before they fire), the raw logits of every forward recorded by a forward hook, and the exit rules
re-written here in plain Python (margins by sorting, the schedules from their formulas).
"""

import math

import pytest
import torch

from d2f.decoding import DecodeConfig, ProphetOptions, SchEDOptions, generate
from d2f.decoding.config import parse_options
from d2f.decoding.sched import prophet_stop, prophet_threshold, sched_threshold
from d2f.family import family_of
from d2f.models import load_model
from tests.decode_helpers import Counter, random_prompts

INF = float("inf")
BS, NEW = 4, 16  # 4 blocks of 4: T = 16 vanilla steps
T = NEW


@pytest.fixture(scope="module")
def models(tiny_dir):
    """Tiny random models by family, each with a forward-hook Counter and a logits log."""
    made = {}
    for fam in ("llada", "dream"):
        model, _ = load_model(tiny_dir(fam))
        log = []
        model.register_forward_hook(lambda m, a, out, log=log: log.append(out.logits.clone()))
        made[fam] = (model, Counter(model), log)
    return made


def _cfg(strategy, **options):
    return DecodeConfig(strategy=strategy, block_size=BS, max_new_tokens=NEW, options=options)


def _run(entry, prompts, cfg, record=False):
    model, counter, log = entry
    counter.reset()
    log.clear()
    out = generate(model, prompts, cfg, record=record)
    assert counter.calls == out.stats.forwards
    return out, list(log)


def _answer_logits(model, logits, prompts):
    """(B, L, V) raw logits of one full forward -> (B, G, V) answer-column predictions."""
    P = max(len(p) for p in prompts)
    if family_of(model).shift_logits:  # column j is predicted by the position before it
        return logits[:, P - 1 : -1]
    return logits[:, P:]


def _margin_mean(answer_logits, cols=None):
    """Mean over the columns of top-1 minus top-2 raw logit, one float per row (by sorting)."""
    out = []
    for row in answer_logits.double():
        picked = range(row.shape[0]) if cols is None else [c for c in cols if c < row.shape[0]]
        ranked = [row[c].sort().values for c in picked]
        gaps = [float(r[-1] - r[-2]) for r in ranked]
        out.append(sum(gaps) / len(gaps) if gaps else -INF)
    return out


def _tau(kind, hi, lo, p, k=16.0):
    if kind == "linear":
        return hi + (lo - hi) * p
    if kind == "cosine":
        return lo + (hi - lo) * (math.cos(math.pi * p) + 1) / 2
    return lo + (hi - lo) * math.exp(-k * p)


def _cut(tokens, ends):
    tokens = list(tokens[:NEW])
    return next((tokens[:i] for i, t in enumerate(tokens) if t in ends), tokens)


# ---- the schedules ---------------------------------------------------------------------------


def test_schedules_run_from_tau_high_down():
    for kind in ("linear", "cosine", "exponential"):
        values = [sched_threshold(kind, 7.5, 2.5, i / 100, 16.0) for i in range(101)]
        assert values[0] == pytest.approx(7.5)
        assert all(a >= b for a, b in zip(values, values[1:], strict=False))  # non-increasing
        assert values[-1] == pytest.approx(2.5, abs=1e-6)  # exp: 2.5 + 5 e^-16
    # hand-worked midpoints: linear and cosine at p = 1/2, exponential at p = ln 2 / k
    assert sched_threshold("linear", 8.0, 2.0, 0.5, 1.0) == pytest.approx(5.0)
    assert sched_threshold("cosine", 8.0, 2.0, 0.5, 1.0) == pytest.approx(5.0)
    assert sched_threshold("cosine", 8.0, 2.0, 0.25, 1.0) == pytest.approx(2 + 6 * 0.853553, 1e-5)
    assert sched_threshold("exponential", 8.0, 2.0, math.log(2) / 4, 4.0) == pytest.approx(5.0)
    assert sched_threshold("linear", INF, INF, 0.3, 1.0) == INF
    assert sched_threshold("cosine", -INF, -INF, 0.3, 1.0) == -INF


def test_prophet_schedule_table():
    # the released `should_early_exit`: 7.5 below progress 0.33, 5.0 below 0.67, else 2.5
    table = {0.0: 7.5, 0.1: 7.5, 0.3299: 7.5, 0.33: 5.0, 0.5: 5.0, 0.6699: 5.0, 0.67: 2.5, 1.0: 2.5}
    for p, tau in table.items():
        assert prophet_threshold(p, 7.5, 5.0, 2.5) == tau
    o = ProphetOptions()
    assert (o.early, o.mid, o.late, o.answer_length) == (7.5, 5.0, 2.5, 5)


def test_prophet_rule_on_hand_built_logits():
    # 2 rows, 8 answer columns, vocabulary 6. Row 0: margin 8 in every column; row 1: margin 6
    # in the region (columns 0-4) and 100 outside it, which Prophet must not look at.
    logits = torch.zeros(2, 8, 6)
    logits[0, :, 2] = 8.0
    logits[1, :5, 4] = 6.0
    logits[1, 5:, 1] = 100.0
    o = ProphetOptions()
    assert prophet_stop(logits, 0.1, o).tolist() == [True, False]  # tau 7.5
    assert prophet_stop(logits, 0.5, o).tolist() == [True, True]  # tau 5.0
    # the region cut at the answer's end: columns 6, 7 only (row 1: 100 there)
    assert prophet_stop(logits, 0.1, ProphetOptions(answer_start=6)).tolist() == [True, True]
    # a region entirely past the answer never stops
    assert prophet_stop(logits, 1.0, ProphetOptions(answer_start=8)).tolist() == [False, False]
    # the mean over the region, not its maximum: margins 8, 8, 0, 0, 0 -> 3.2 < 5.0, >= 2.5
    mixed = torch.zeros(1, 8, 6)
    mixed[0, :2, 0] = 8.0
    assert prophet_stop(mixed, 0.5, o).tolist() == [False]
    assert prophet_stop(mixed, 0.9, o).tolist() == [True]


def test_options_checked_and_parsed():
    with pytest.raises(ValueError, match="tau_low"):
        SchEDOptions(tau_high=1.0, tau_low=2.0)
    with pytest.raises(ValueError, match="schedule"):
        SchEDOptions(schedule="step")
    with pytest.raises(ValueError, match="answer_length"):
        ProphetOptions(answer_length=0)
    parsed = parse_options("sched", ["schedule=cosine", "tau_high=inf", "tau_low=-inf"])
    assert parsed == {"schedule": "cosine", "tau_high": INF, "tau_low": -INF}
    assert SchEDOptions() == SchEDOptions("exponential", 7.5, 2.5, 16.0)


# ---- decoding --------------------------------------------------------------------------------


@pytest.mark.parametrize("fam", ["llada", "dream"])
@pytest.mark.parametrize("strategy", ["sched", "prophet"])
def test_infinite_threshold_is_vanilla(models, fam, strategy):
    prompts = random_prompts()
    base, _ = _run(models[fam], prompts, _cfg("vanilla"))
    inf = (
        {"tau_high": INF, "tau_low": INF}
        if strategy == "sched"
        else dict.fromkeys(("early", "mid", "late"), INF)
    )
    out, _ = _run(models[fam], prompts, _cfg(strategy, **inf))
    assert out.tokens == base.tokens
    assert out.stats.forwards == base.stats.forwards == T  # vanilla: no prefill, T full forwards
    assert [r.forwards for r in out.stats.rows] == [T] * 3


@pytest.mark.parametrize("fam", ["llada", "dream"])
def test_minus_infinite_threshold_is_one_forward_of_argmax(models, fam):
    model = models[fam][0]
    prompts = random_prompts()
    out, log = _run(models[fam], prompts, _cfg("sched", tau_high=-INF, tau_low=-INF))
    assert out.stats.forwards == 1 and len(log) == 1  # vanilla has no separate prefill
    answer = _answer_logits(model, log[0], prompts).clone()
    answer[..., family_of(model).mask_token_id] = -INF  # the mask id is never predicted
    ends = set(family_of(model).end_token_ids)
    assert out.tokens == [_cut(row, ends) for row in answer.argmax(-1).tolist()]


def _replay(gbars, taus_of_p):
    """Exit step of one row: the first t in 1..T with gbar_t >= tau(t / T); T if none."""
    return next((t for t in range(1, T + 1) if gbars[t - 1] >= taus_of_p(t / T)), None)


@pytest.mark.parametrize("fam", ["llada", "dream"])
@pytest.mark.parametrize("kind", ["linear", "cosine", "exponential", "prophet"])
def test_exit_step_matches_a_replay_of_the_recorded_margins(models, fam, kind):
    model = models[fam][0]
    mask_id = family_of(model).mask_token_id
    ends = set(family_of(model).end_token_ids)
    prompts = random_prompts((6, 4, 8, 5), seed=3)
    base, log = _run(models[fam], prompts, _cfg("vanilla"), record=True)
    answers = [_answer_logits(model, logits, prompts) for logits in log]  # T x (B, G, V)
    cols = range(2, 7) if kind == "prophet" else None  # Prophet: 5 columns from answer_start 2
    gbar = [_margin_mean(a, cols) for a in answers]  # T x B
    flat = sorted(g for step in gbar for g in step)
    lo, mid, hi = flat[len(flat) // 5], flat[len(flat) // 2], flat[-len(flat) // 10]
    if kind == "prophet":
        opts = {"early": hi, "mid": mid, "late": lo, "answer_start": 2}

        def tau(p):
            return hi if p < 0.33 else mid if p < 0.67 else lo
    else:
        opts = {"schedule": kind, "tau_high": hi, "tau_low": lo, "k": 3.0}

        def tau(p):
            return _tau(kind, hi, lo, p, 3.0)

    out, _ = _run(models[fam], prompts, _cfg("prophet" if kind == "prophet" else "sched", **opts))
    exits = []
    for b in range(len(prompts)):
        t_exit = _replay([g[b] for g in gbar], tau)
        exits.append(t_exit)
        assert out.stats.rows[b].forwards == (t_exit or T)
        if t_exit is None:
            assert out.tokens[b] == base.tokens[b]
            continue
        # vanilla's answer after step t_exit - 1, every mask left filled from forward t_exit
        before = base.trace[t_exit - 2].answer[b] if t_exit > 1 else torch.full((NEW,), mask_id)
        pred = answers[t_exit - 1][b].clone()
        pred[:, mask_id] = -INF
        filled = torch.where(before == mask_id, pred.argmax(-1), before)
        assert out.tokens[b] == _cut(filled.tolist(), ends)
    assert any(t is not None and 1 < t < T for t in exits), exits  # the exit really is mid-run


@pytest.mark.parametrize("fam", ["llada", "dream"])
def test_a_lower_schedule_never_exits_later(models, fam):
    model = models[fam][0]
    earlier = 0
    for seed in range(3):
        prompts = random_prompts((4, 7, 5), seed=10 + seed)
        _, log = _run(models[fam], prompts, _cfg("vanilla"))
        flat = sorted(g for lg in log for g in _margin_mean(_answer_logits(model, lg, prompts)))
        scale = flat[len(flat) // 2]
        for kind in ("linear", "cosine", "exponential"):
            # pointwise lower: both ends lowered, then the whole schedule shifted down
            settings = [(1.6, 1.0), (1.3, 0.9), (1.0, 0.6), (0.7, 0.3)]
            forwards = []
            for hi, lo in settings:
                out, _ = _run(
                    models[fam],
                    prompts,
                    _cfg("sched", schedule=kind, tau_high=hi * scale, tau_low=lo * scale, k=4.0),
                )
                forwards.append([r.forwards for r in out.stats.rows])
            for higher, lower in zip(forwards, forwards[1:], strict=False):
                assert all(b <= a for a, b in zip(higher, lower, strict=True)), forwards
                earlier += sum(b < a for a, b in zip(higher, lower, strict=True))
    assert earlier > 0  # some row did exit earlier: the property is not vacuous


@pytest.mark.parametrize("fam", ["llada", "dream"])
@pytest.mark.parametrize("strategy", ["sched", "prophet"])
def test_batched_equals_alone(models, fam, strategy):
    model = models[fam][0]
    prompts = random_prompts((5, 9, 3, 7), seed=5)
    _, log = _run(models[fam], prompts, _cfg("vanilla"))
    flat = sorted(g for lg in log for g in _margin_mean(_answer_logits(model, lg, prompts)))
    hi, lo = flat[-len(flat) // 5], flat[len(flat) // 5]
    if strategy == "sched":
        cfg = _cfg("sched", schedule="linear", tau_high=hi, tau_low=lo)
    else:
        cfg = _cfg(
            "prophet", early=hi, mid=(hi + lo) / 2, late=lo, answer_start=0, answer_length=16
        )
    batched, _ = _run(models[fam], prompts, cfg)
    rows = [r.forwards for r in batched.stats.rows]
    assert len(set(rows)) > 1 or rows[0] < T, rows  # rows exit, and on their own
    for b, p in enumerate(prompts):
        alone, _ = _run(models[fam], [p], cfg)
        assert alone.tokens == [batched.tokens[b]]
        assert alone.stats.rows[0].forwards == rows[b]
