"""Tests for d2f.loss: hand values, 1/ratio weighting, per-row reduction, shift, dtypes."""

import math

import pytest
import torch
import torch.nn.functional as F

from d2f.loss import distill_loss, distill_terms, mdm_loss

LN2, LN3 = math.log(2.0), math.log(3.0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def logits_of(*probs: list[float]) -> torch.Tensor:
    """(1, len(probs), V) logits whose softmax is exactly the given distributions."""
    return torch.tensor(probs).log().unsqueeze(0)


def token_ce(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Reference per-position soft CE, (..., V) -> (...), written independently of d2f.loss."""
    return -(teacher.softmax(-1) * student.log_softmax(-1)).sum(-1)


# Two masked tokens, vocabulary of 3:
#   token 0: p_S = (1/2, 1/4, 1/4), p_T = (1/4, 1/4, 1/2), ratio 1/2
#       H(p_T, p_S) = 1/4 ln 2 + 1/4 ln 4 + 1/2 ln 4 = 1.75 ln 2;  H(p_T) = 1.5 ln 2
#   token 1: p_S = (1/3, 1/3, 1/3), p_T = (1/2, 1/4, 1/4), ratio 1/4
#       H(p_T, p_S) = ln 3;  H(p_T) = 1/2 ln 2 + 1/2 ln 4 = 1.5 ln 2
STUDENT = logits_of([0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3])
TEACHER = logits_of([0.25, 0.25, 0.5], [0.5, 0.25, 0.25])
MASKED = torch.tensor([[True, True]])
P_MASK = torch.tensor([[0.5, 0.25]])


def test_distill_hand_value():
    terms = distill_terms(STUDENT, TEACHER, MASKED, P_MASK)
    want_loss = (1.75 * LN2 / 0.5 + LN3 / 0.25) / 2
    want_ent = (1.5 * LN2 / 0.5 + 1.5 * LN2 / 0.25) / 2
    want_kl = (0.25 * LN2 / 0.5 + (LN3 - 1.5 * LN2) / 0.25) / 2
    assert terms.loss.item() == pytest.approx(want_loss, rel=1e-6)
    assert terms.teacher_entropy.item() == pytest.approx(want_ent, rel=1e-6)
    assert terms.kl.item() == pytest.approx(want_kl, rel=1e-5)
    assert distill_loss(STUDENT, TEACHER, MASKED, P_MASK).item() == terms.loss.item()


def test_mdm_hand_value_and_one_hot_teacher_limit():
    clean = torch.tensor([[0, 2]])  # -log p_S: ln 2 and ln 3
    got = mdm_loss(STUDENT, clean, MASKED, P_MASK)
    assert got.item() == pytest.approx((LN2 / 0.5 + LN3 / 0.25) / 2, rel=1e-6)
    peaked = 60.0 * F.one_hot(clean, 3).float()  # softmax = one-hot up to e^-60
    assert distill_loss(STUDENT, peaked, MASKED, P_MASK).item() == pytest.approx(got.item())


def test_zero_kl_when_student_is_teacher():
    logits = torch.randn(3, 7, 11, generator=torch.Generator().manual_seed(0))
    masked = torch.rand(3, 7, generator=torch.Generator().manual_seed(1)) < 0.5
    p_mask = torch.full((3, 7), 0.4)
    terms = distill_terms(logits, logits.clone(), masked, p_mask)
    assert terms.kl.item() == 0.0
    ent = torch.distributions.Categorical(logits=logits).entropy() / p_mask  # (3, 7)
    rows = [ent[b][masked[b]].mean() for b in range(3) if masked[b].any()]
    want = torch.stack(rows).mean()
    torch.testing.assert_close(terms.loss, want)
    torch.testing.assert_close(terms.teacher_entropy, want)


def test_one_over_ratio_weighting():
    # Halving token 1's ratio doubles its term: the loss grows by exactly ln 3 / 0.25 / 2.
    base = distill_loss(STUDENT, TEACHER, MASKED, P_MASK).item()
    lower = distill_loss(STUDENT, TEACHER, MASKED, torch.tensor([[0.5, 0.125]])).item()
    assert lower - base == pytest.approx(LN3 / 0.25 / 2, rel=1e-5)


def test_mean_of_row_means_not_flat_token_mean():
    g = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    masked = torch.tensor(
        [[True, False, False, False], [True, True, True, False], [False] * 4]  # 1, 3, 0 tokens
    )
    p_mask = torch.tensor([[0.3] * 4, [0.6] * 4, [0.5] * 4])
    c = token_ce(student, teacher) / p_mask  # (3, 4) weighted per-token terms
    row0, row1 = c[0, 0], (c[1, 0] + c[1, 1] + c[1, 2]) / 3
    want = (row0 + row1) / 2  # row 2 has nothing masked and does not count
    flat = (c[0, 0] + c[1, 0] + c[1, 1] + c[1, 2]) / 4
    got = distill_loss(student, teacher, masked, p_mask)
    torch.testing.assert_close(got, want)
    assert abs(got.item() - flat.item()) > 0.05
    clean = torch.randint(0, 5, (3, 4), generator=g)
    nll = F.cross_entropy(student.transpose(1, 2), clean, reduction="none") / p_mask
    want_mdm = (nll[0, 0] + nll[1, :3].mean()) / 2
    torch.testing.assert_close(mdm_loss(student, clean, masked, p_mask), want_mdm)


def test_shift_uses_previous_row():
    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(1, 4, 6, generator=g), torch.randn(1, 4, 6, generator=g)
    masked = torch.tensor([[False, False, True, False]])
    p_mask = torch.full((1, 4), 0.5)
    ce = token_ce(student, teacher)[0] / 0.5  # (4,)
    torch.testing.assert_close(distill_loss(student, teacher, masked, p_mask), ce[2])
    shifted = distill_loss(student, teacher, masked, p_mask, shift=True)
    torch.testing.assert_close(shifted, ce[1])  # token 2 predicted by row 1
    assert abs(shifted.item() - ce[2].item()) > 1e-3
    clean = torch.tensor([[0, 1, 4, 2]])
    nll = -student[0].log_softmax(-1)[1, 4] / 0.5
    torch.testing.assert_close(mdm_loss(student, clean, masked, p_mask, shift=True), nll)
    # Position 0 has no previous row: masking only it leaves nothing to predict.
    only0 = torch.tensor([[True, False, False, False]])
    assert distill_loss(student, teacher, only0, p_mask, shift=True).item() == 0.0


@pytest.mark.parametrize("shift", [False, True])
def test_nothing_masked_zero_loss_and_grad(shift):
    student = torch.randn(2, 5, 7, requires_grad=True)
    teacher = torch.randn(2, 5, 7)
    masked = torch.zeros(2, 5, dtype=torch.bool)
    p_mask = torch.zeros(2, 5)  # even a zero ratio is harmless when nothing is masked
    terms = distill_terms(student, teacher, masked, p_mask, shift=shift)
    assert all(t.item() == 0.0 for t in terms)
    terms.loss.backward()
    assert student.grad is not None and torch.equal(student.grad, torch.zeros_like(student))
    logits = torch.randn(2, 5, 7, requires_grad=True)
    loss = mdm_loss(logits, torch.zeros(2, 5, dtype=torch.long), masked, p_mask, shift=shift)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_teacher_detached_and_grad_matches_kl():
    student = torch.randn(2, 3, 5, requires_grad=True)
    teacher = torch.randn(2, 3, 5, requires_grad=True)
    masked, p_mask = torch.ones(2, 3, dtype=torch.bool), torch.full((2, 3), 0.5)
    terms = distill_terms(student, teacher, masked, p_mask)
    (g_loss,) = torch.autograd.grad(terms.loss, student, retain_graph=True)
    (g_kl,) = torch.autograd.grad(terms.kl, student, retain_graph=True)
    torch.testing.assert_close(g_loss, g_kl)
    terms.loss.backward()
    assert teacher.grad is None
    torch.testing.assert_close(terms.loss, terms.kl + terms.teacher_entropy)


def test_teacher_zero_probabilities_stay_finite():
    teacher = torch.tensor([[[0.0, float("-inf"), 1.0]]])
    student = torch.tensor([[[0.5, -2.0, 0.1]]], requires_grad=True)
    terms = distill_terms(student, teacher, torch.tensor([[True]]), torch.tensor([[1.0]]))
    assert all(torch.isfinite(t) for t in terms)
    terms.loss.backward()
    assert torch.isfinite(student.grad).all()


def test_bf16_computed_in_fp32():
    g = torch.Generator().manual_seed(4)
    student = (3 * torch.randn(2, 16, 1000, generator=g)).bfloat16()
    teacher = (3 * torch.randn(2, 16, 1000, generator=g)).bfloat16()
    masked = torch.rand(2, 16, generator=g) < 0.5
    p_mask = torch.full((2, 16), 0.3)
    got = distill_terms(student, teacher, masked, p_mask)
    want = distill_terms(student.float(), teacher.float(), masked, p_mask)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    clean = torch.randint(0, 1000, (2, 16), generator=g)
    got_mdm = mdm_loss(student, clean, masked, p_mask)
    assert got_mdm.dtype == torch.float32
    torch.testing.assert_close(got_mdm, mdm_loss(student.float(), clean, masked, p_mask))


def test_mdm_loss_elbo_normalisation_by_maskable_count():
    """With `maskable`, a row's sum of CE / t is divided by its maskable (answer) count, not by its
    masked count: 1 masked of 3 maskable at t = 0.5 gives CE / 0.5 / 3 (hand value)."""
    logits = torch.zeros(1, 4, 3)
    logits[0, 1] = torch.tensor([2.0, 0.0, -1.0])
    clean = torch.tensor([[0, 1, 2, 0]])
    masked = torch.tensor([[False, True, False, False]])
    maskable = torch.tensor([[False, True, True, True]])
    p_mask = torch.full((1, 4), 0.5)
    ce = -(0.0 - math.log(math.exp(2.0) + 1.0 + math.exp(-1.0)))  # -log softmax(.)[1]
    got = mdm_loss(logits, clean, masked, p_mask, maskable=maskable)
    assert got.item() == pytest.approx(ce / 0.5 / 3, rel=1e-6)
    assert mdm_loss(logits, clean, masked, p_mask).item() == pytest.approx(ce / 0.5, rel=1e-6)
