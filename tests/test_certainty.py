"""dParallel / d3LLM objectives (d2f.certainty): views on literal rows, losses against hand-written
references, the curricula, and the tiny presets training and resuming exactly."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from d2f.certainty import (
    LossSpec,
    ViewsBatch,
    active_regions,
    certainty_step,
    complementary_views,
    d3llm_batch,
    dparallel_batch,
    micro_batch_ratios,
    progressive_block_size,
    trajectory_mask,
)
from d2f.config import CertaintyConfig, NoiseConfig
from d2f.data import NEVER_DECODED, TokenBatch
from d2f.objectives import BatchContext
from d2f.train import main
from tests.train_helpers import (
    TINY_QA,
    kill_and_resume,
    mean,
    read_metrics,
    tiny_config,
    write_sharp_teacher,
)

M = 99  # the mask id of these literal examples


def _family(shift: bool = False):
    return SimpleNamespace(name="test", mask_token_id=M, shift_logits=shift)


def test_views_on_a_literal_row():
    """Active block [4, 6) of a row with prompt [0, 2): view 1 masks the inner set, view 2 the
    rest of the block; both mask everything >= 6; the prefix stays clean."""
    ids = torch.tensor([[10, 11, 12, 13, 14, 15, 16, 17]])
    inner = torch.tensor([[1, 1, 0, 1, 1, 0, 1, 0]], dtype=torch.bool)  # only [4, 6) matters
    valid = torch.ones_like(inner)
    n1, m1, n2, m2 = complementary_views(ids, inner, torch.tensor([4]), torch.tensor([6]), M, valid)
    assert n1.tolist() == [[10, 11, 12, 13, M, 15, M, M]]
    assert n2.tolist() == [[10, 11, 12, 13, 14, M, M, M]]
    assert m1.tolist() == [[0, 0, 0, 0, 1, 0, 0, 0]]
    assert m2.tolist() == [[0, 0, 0, 0, 0, 1, 0, 0]]
    # not attended (mask_padding=false): never masked, never in the loss
    valid[0, 7] = False
    n1, *_ = complementary_views(ids, inner, torch.tensor([4]), torch.tensor([6]), M, valid)
    assert n1.tolist() == [[10, 11, 12, 13, M, 15, M, 17]]


def test_active_regions_per_row():
    """Rows of different prompt lengths each draw their own block k in {0..n}: s = P + k Bk,
    e = s + Bk, or the span's end for k = n (empty when the span is whole blocks)."""
    P = torch.tensor([2, 5, 3])
    end = torch.tensor([12, 12, 7])  # spans 10, 7, 4 -> n = 3, 2, 1 (rests 1, 1, 1)
    seen, pairs = [set(), set(), set()], set()
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        s, e = active_regions(P, end, end, 3, g)
        pairs.add((int(s[0] - P[0]), int(s[1] - P[1])))
        for b in range(3):
            k, rest = divmod(int(s[b] - P[b]), 3)
            assert rest == 0
            n = int(end[b] - P[b]) // 3
            assert int(e[b]) == (int(s[b]) + 3 if k < n else int(end[b]))
            seen[b].add(k)
    assert seen == [{0, 1, 2, 3}, {0, 1, 2}, {0, 1}]
    assert len(pairs) == 4 * 3  # rows draw independently (upstream's one region for all rows: 3)


def test_trajectory_mask_intended_and_upstream():
    """Block [4, 6) of a row with prompt 2 whose teacher decoded positions 4, 5 at steps 3, 2;
    one token to keep clean. intended: the first decoded (5) is clean. upstream: the state after
    (4 - 2) + 1 + 1 steps, so both are clean (the off-by-one)."""
    rank = torch.tensor([[-1, -1, 0, 1, 3, 2, 5, 4, NEVER_DECODED, NEVER_DECODED]])
    P, s, e, n = torch.tensor([2]), torch.tensor([4]), torch.tensor([6]), torch.tensor([1])
    intended = trajectory_mask(rank, P, s, e, n, "intended")
    assert intended[0, 4:6].tolist() == [True, False]
    upstream = trajectory_mask(rank, P, s, e, n, "upstream")
    assert upstream[0, 4:6].tolist() == [False, False]
    # a block that reaches positions the teacher never decoded: those stay masked
    s, e, n = torch.tensor([6]), torch.tensor([10]), torch.tensor([1])
    assert trajectory_mask(rank, P, s, e, n, "intended")[0, 6:10].tolist() == [1, 0, 1, 1]
    # upstream: idx = min(4 + 1, T - 1 = 5) = 5 -> masked iff rank > 5
    assert trajectory_mask(rank, P, s, e, n, "upstream")[0, 6:10].tolist() == [0, 0, 1, 1]


def test_curricula():
    sizes = [16, 16, 24, 24, 32, 32]
    got = [progressive_block_size(x, sizes) for x in (0.0, 0.5, 1.5, 2.25, 3.5, 4.9, 5.5, 9.0)]
    assert got == [16, 16, 20, 24, 28, 32, 32, 32]
    g = torch.Generator().manual_seed(0)
    r = micro_batch_ratios(10, 4, 0.0, 0.8, 0.75, g)
    assert r.shape == (10,) and bool(((r >= 0.6) & (r <= 0.8)).all())
    assert len(set(r[:4].tolist())) == 1 and len(set(r[4:8].tolist())) == 1
    assert len(set(r.tolist())) == 3  # one draw per micro-batch of 4 (the last one partial)


def _tokens(rank: bool = True) -> TokenBatch:
    """Three rows of different prompt and answer lengths, L = 12."""
    P = torch.tensor([2, 3, 5])
    lengths = torch.tensor([9, 12, 8])
    ids = torch.arange(3 * 12).reshape(3, 12) + 10
    ranks = None
    if rank:
        g = torch.Generator().manual_seed(1)
        ranks = torch.full((3, 12), NEVER_DECODED)
        for b in range(3):
            p = int(P[b])
            ranks[b, :p] = -1
            ranks[b, p:] = torch.randperm(12 - p, generator=g)
    return TokenBatch(ids, P, lengths, ranks)


def _ctx(**kw) -> BatchContext:
    return BatchContext(
        step=5, max_steps=10, epoch=0.3, micro_batch_size=2, certainty=CertaintyConfig(**kw)
    )


@pytest.mark.parametrize("objective", ["dparallel", "d3llm", "d3llm_bernoulli"])
def test_batches_are_complementary_views(objective):
    """In every row: one region [s, e) with s - P a multiple of the block, view 1 and view 2
    partition it, both views mask every position >= e, the prefix is clean."""
    build = dparallel_batch if objective == "dparallel" else d3llm_batch
    tokens = _tokens(rank=objective == "d3llm")
    noise = NoiseConfig(block_size=3)
    for seed in range(20):
        batch = build(tokens, _family(), noise, torch.Generator().manual_seed(seed), _ctx())
        for b in range(3):
            region = (batch.masked[b] | batch.masked_c[b]).nonzero().flatten().tolist()
            assert not (batch.masked[b] & batch.masked_c[b]).any()
            s = region[0] if region else None
            if s is None:
                continue
            e = region[-1] + 1
            assert region == list(range(s, e)) and (s - int(tokens.prompt_lens[b])) % 3 == 0
            x = tokens.input_ids[b]
            for view in (batch.noisy_ids[b], batch.noisy_c[b]):
                assert view[:s].tolist() == x[:s].tolist()
                assert (view[e:] == M).all()
            assert (batch.noisy_ids[b][s:e] == M).tolist() == batch.masked[b][s:e].tolist()


def test_d3llm_intended_keeps_the_first_decoded_clean():
    """intended: exactly floor((1 - r)(e - s)) tokens of the block are clean in view 1, and they
    are the block's earliest-decoded ones (recomputed here from the same draws)."""
    tokens, noise = _tokens(), NoiseConfig(block_size=3)
    ctx = _ctx(block_sizes=[2, 4])  # epoch 0.3 -> block 2 + 0.3 * 2 = 2.6 -> 2
    for seed in range(10):
        batch = d3llm_batch(tokens, _family(), noise, torch.Generator().manual_seed(seed), ctx)
        g = torch.Generator().manual_seed(seed)
        s, e = active_regions(tokens.prompt_lens, tokens.lengths, torch.full((3,), 12), 2, g)
        r = micro_batch_ratios(3, 2, 0.0, 0.8, 0.5, g)
        for b in range(3):
            block = list(range(int(s[b]), int(e[b])))
            n_clean = int((1 - float(r[b])) * len(block))
            by_rank = sorted(block, key=lambda j: (int(tokens.decode_rank[b, j]), j))
            clean = set(by_rank[:n_clean])
            assert [bool(batch.masked[b, j]) for j in block] == [j not in clean for j in block]


def _reference(z: torch.Tensor, y: torch.Tensor, masked: torch.Tensor, T: float, shift: bool):
    """Plain loops: token-mean CE over masked positions, mean entropy at T over the correct ones."""
    ce, ent, n, c = 0.0, 0.0, 0, 0
    B, L, V = z.shape
    for b in range(B):
        for j in range(L):
            i = j - 1 if shift else j  # the logits row that scores token j
            if not masked[b, j] or i < 0:
                continue
            row = z[b, i]
            log_norm = torch.log(sum(torch.exp(row[v]) for v in range(V)))
            ce = ce + (log_norm - row[y[b, j]])
            n += 1
            if int(torch.argmax(row)) == int(y[b, j]):
                q = [torch.exp(row[v] / T) for v in range(V)]
                total = sum(q)
                ent = ent - sum(qv / total * torch.log(qv / total) for qv in q)
                c += 1
    return ce / max(n, 1), ent / max(c, 1)


class _FixedLogits(torch.nn.Module):
    """Returns the given logits for view 1 then view 2; records the attention masks it got."""

    def __init__(self, z1, z2):
        super().__init__()
        self.z, self.masks = [z1, z2], []

    def forward(self, input_ids, attention_mask, position_ids, use_cache):
        self.masks.append(attention_mask)
        return SimpleNamespace(logits=self.z[len(self.masks) - 1])


@pytest.mark.parametrize(
    "shift,lam,both,scale",
    [(False, 2.0, True, 1.0), (False, 2.0, False, 0.25), (True, 1.0, True, 0.25)],
)
def test_loss_against_a_hand_written_reference(shift, lam, both, scale):
    """dparallel-LLaDA, d3llm-LLaDA, d3llm/dparallel-Dream weighting on 3 rows of different
    lengths; row 2 of view 2 has nothing masked. Loss and gradients match the loops."""
    g = torch.Generator().manual_seed(0)
    B, L, V, T = 3, 6, 5, 0.5
    y = torch.randint(0, V, (B, L), generator=g)
    z1 = (3 * torch.randn(B, L, V, generator=g)).requires_grad_()
    z2 = (3 * torch.randn(B, L, V, generator=g)).requires_grad_()
    for b, j in ((0, 2), (1, 3), (2, 1), (0, 4)):  # make some predictions correct
        with torch.no_grad():
            z1[b, j - 1 if shift else j, y[b, j]] += 10
    m1 = torch.tensor(
        [[0, 0, 1, 0, 1, 0], [0, 0, 0, 1, 1, 1], [0, 1, 0, 0, 0, 0]], dtype=torch.bool
    )
    m2 = torch.tensor(
        [[0, 0, 0, 1, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool
    )
    valid = torch.tensor([[1] * 6, [1] * 6, [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    blocks = torch.where(valid, 1, -1)
    spec = LossSpec(T, lam, both, scale)
    batch = ViewsBatch(y, y, m1, y, m2, blocks, valid, torch.arange(L).expand(B, L), spec)
    model = _FixedLogits(z1, z2)
    loss, metrics = certainty_step(model, batch, _family(shift), torch.float32)
    ce1, ent1 = _reference(z1, y, m1, T, shift)
    ce2, ent2 = _reference(z2, y, m2, T, shift)
    want = scale * (ce1 + ce2 + lam * (ent1 + ent2 if both else ent1))
    assert math.isclose(loss.item(), want.item(), rel_tol=1e-5)
    assert math.isclose(metrics["ce_2"].item(), ce2.item(), rel_tol=1e-5)
    assert ent1.item() > 0
    grads = torch.autograd.grad(loss, (z1, z2))
    want_grads = torch.autograd.grad(want, (z1, z2))
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # bidirectional: every attended query sees every attended key
    pair = valid[:, :, None] & valid[:, None, :]  # (B, L, L)
    assert all(bool((mask[:, 0][pair] == 0).all()) for mask in model.masks)


def test_a_view_with_nothing_masked_is_an_exact_zero_with_a_graph():
    B, L, V = 2, 4, 3
    z = torch.randn(B, L, V, requires_grad=True)
    none = torch.zeros(B, L, dtype=torch.bool)
    y = torch.zeros(B, L, dtype=torch.long)
    batch = ViewsBatch(
        y,
        y,
        none,
        y,
        none,
        torch.ones(B, L, dtype=torch.long),
        none | True,
        torch.arange(L).expand(B, L),
        LossSpec(0.5, 2.0, True, 1.0),
    )
    loss, metrics = certainty_step(_FixedLogits(z, z), batch, _family(), torch.float32)
    assert float(loss.detach()) == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert z.grad is not None and float(z.grad.abs().sum()) == 0.0
    assert float(metrics["acc_1"]) == 0.0


@pytest.fixture(scope="module")
def trajectories(tmp_path_factory):
    """The tiny LLaDA's own answers and decode ranks for tests/data/tiny_qa.jsonl."""
    from d2f.models import load_model
    from d2f.trajectories import write_trajectories

    root = tmp_path_factory.mktemp("traj")
    teacher = write_sharp_teacher(root / "llada")
    model, tok = load_model(teacher)
    rows = [json.loads(line) for line in TINY_QA.read_text().splitlines()]
    out = root / "traj.jsonl"
    write_trajectories(
        model, tok, [r["question"] for r in rows], None, out, 4, 16, 128, progress=False
    )
    return teacher, out


OBJECTIVE_RUNS = {
    "dparallel": ("train=tiny_dparallel",),
    "d3llm": ("train=tiny_d3llm",),
    "d3llm_upstream": ("train=tiny_d3llm", "train.certainty.trajectory=upstream"),
}


@pytest.mark.slow  # ~10-15 s each on a shared 2-core machine
@pytest.mark.parametrize("name", list(OBJECTIVE_RUNS))
def test_tiny_presets_learn(trajectories, tmp_path, name):
    """40 steps of each tiny preset on the teacher's own trajectories: the loss falls."""
    teacher, data = trajectories
    run = tmp_path / name
    main(
        tiny_config(
            teacher,
            run,
            *OBJECTIVE_RUNS[name],
            f"data.sources=[{data}]",
            "data.answer_field=answer",
            "train.max_steps=40",
            "train.save_every=40",
        )
    )
    recs = read_metrics(run)
    assert [r["step"] for r in recs] == list(range(1, 41))
    assert mean(recs[-10:], "loss") < 0.8 * mean(recs[:10], "loss"), [r["loss"] for r in recs]


@pytest.mark.slow  # ~15 s each
@pytest.mark.parametrize("name", ["dparallel", "d3llm"])
def test_kill_and_resume_is_exact(trajectories, tmp_path, monkeypatch, name):
    teacher, data = trajectories
    opts = (*OBJECTIVE_RUNS[name], f"data.sources=[{data}]", "data.answer_field=answer")
    kill_and_resume(
        name, lambda out, *o: tiny_config(teacher, out, *opts, *o), tmp_path, monkeypatch
    )
