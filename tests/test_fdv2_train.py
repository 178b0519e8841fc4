"""Fast-dLLM v2's adaptation (d2f.recipes.fast_dllm_v2, objective `fast_dllm_v2`) and its family.

The mask is checked as a literal 0/1 matrix; the loss against a reference written here with
explicit loops (each row alone, padding cut off, the doubled input and its attention rule built
element by element); training, resume, save/load and the decoders on the tiny AR checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from d2f.config import NoiseConfig
from d2f.data import TokenBatch
from d2f.decoding import DecodeConfig, generate
from d2f.family import detect_spec, family_of
from d2f.mask import bd3_mask, block_causal_mask, block_ids, position_ids, to_additive
from d2f.models import adopt_config, build_model, load_model, save_model
from d2f.objectives import Batch, make_batch
from d2f.recipes.fast_dllm_v2 import adapt_checkpoint, fast_dllm_v2_step
from d2f.train import main
from tests.test_fast_dllm_v2 import _reference as v2_reference
from tests.train_helpers import kill_and_resume, mean, read_metrics, tiny_config

NOISE = NoiseConfig("random", 4, lo=1e-3, hi=1.0, mask_padding=False)
FDV2 = ("train.objective=fast_dllm_v2", "train.noise.schedule=random", "train.noise.lo=0.001",
        "train.noise.hi=1.0", "train.noise.block_size=4", "train.noise.mask_padding=false")  # fmt: skip


def _adapted(path, sharpen: float = 1.0):
    """The tiny AR checkpoint at `path` turned into a fast_dllm_v2 model (no training)."""
    model, tok = load_model(path)
    raw, tok = adapt_checkpoint(family_of(model).original_config, tok, NOISE)
    model = adopt_config(model, raw, tok)
    if sharpen != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(sharpen)
    return model, tok


def test_bd3_mask_literal():
    # row 0: prompt of 2 (block 0), blocks of 2: [0, 0, 1, 1, 2]; row 1: [0, 1, 1, pad, pad]
    ids = torch.tensor([[0, 0, 1, 1, 2], [0, 1, 1, -1, -1]])
    want0 = [
        # x_t keys    x_0 keys
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],  # x_t queries: same block | earlier blocks
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 0, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1, 1, 0, 0, 0],  # x_0 queries: never x_t | block <=
        [0, 0, 0, 0, 0, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 1, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1, 1, 1, 1, 1],
    ]
    want1 = [
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 1, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 1, 0, 0, 0, 0],
        [0, 0, 0, 1, 0, 0, 0, 0, 0, 0],  # padding queries: only their own key
        [0, 0, 0, 0, 1, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
    ]
    assert bd3_mask(ids).int().tolist() == [want0, want1]


def _literal_batch(family) -> Batch:
    """Three rows of different lengths (L = 10, blocks of 4 from each prompt end, right padding).

    View 1 of row 1 masks nothing (all its answer goes to view 2); row 2 masks all of its answer.
    """
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(10, 60, (3, 10), generator=g)
    tokens = TokenBatch(ids, torch.tensor([3, 2, 4]), torch.tensor([10, 7, 6]))
    batch = make_batch(tokens, family, NOISE, torch.Generator().manual_seed(0))
    masked = torch.zeros(3, 10, dtype=torch.bool)
    masked[0, [3, 5, 6, 9]] = True
    masked[2, 4:6] = True
    return dataclasses.replace(batch, masked=masked)


@torch.no_grad()
def _reference_loss(model, batch: Batch, mask_id: int, prompt_lens, lengths, bs) -> float:
    """Each row alone, its padding cut off; the doubled input and its mask built by loops."""
    total, n_answer = 0.0, 0
    for b in range(batch.input_ids.shape[0]):
        n, P = int(lengths[b]), int(prompt_lens[b])
        x0 = batch.input_ids[b, :n].tolist()
        blk = [0 if i < P else 1 + (i - P) // bs for i in range(n)]
        answer = [i >= P for i in range(n)]
        n_answer += sum(answer[1:])
        m1 = [bool(batch.masked[b, i]) for i in range(n)]
        for view in (m1, [a and not m for a, m in zip(answer, m1, strict=True)]):
            xt = [mask_id if view[i] else x0[i] for i in range(n)]
            allowed = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
            for q in range(2 * n):
                for k in range(2 * n):
                    bq, bk = blk[q % n], blk[k % n]
                    if q < n and k < n:
                        allowed[q, k] = bk == bq
                    elif q < n:
                        allowed[q, k] = bk < bq
                    elif k >= n:
                        allowed[q, k] = bk <= bq
            out = model(
                input_ids=torch.tensor([xt + x0]),
                attention_mask=to_additive(allowed[None]),
                position_ids=torch.tensor([list(range(n)) * 2]),
            ).logits[0]
            for j in range(1, n):
                if view[j]:
                    total -= float(out[j - 1].float().log_softmax(-1)[x0[j]])
    return total / n_answer


def test_loss_equals_the_loop_reference(tiny_dir):
    model, _ = _adapted(tiny_dir("ar"), sharpen=5.0)
    fam = family_of(model)
    batch = _literal_batch(fam)
    with torch.no_grad():
        loss, parts = fast_dllm_v2_step(model, batch, fam, torch.float32)
    want = _reference_loss(
        model, batch, fam.mask_token_id, torch.tensor([3, 2, 4]), torch.tensor([10, 7, 6]), 4
    )
    assert math.isclose(float(loss), want, rel_tol=1e-5)
    assert math.isclose(float(parts["view_masked"] + parts["view_complement"]), float(loss))
    nothing = dataclasses.replace(batch, masked=torch.zeros_like(batch.masked))
    with torch.no_grad():
        loss0, parts0 = fast_dllm_v2_step(model, nothing, fam, torch.float32)
    assert float(parts0["view_masked"]) == 0.0 and math.isfinite(float(loss0))
    want0 = _reference_loss(
        model, nothing, fam.mask_token_id, torch.tensor([3, 2, 4]), torch.tensor([10, 7, 6]), 4
    )
    assert math.isclose(float(loss0), want0, rel_tol=1e-5)


def test_noise_is_per_block_and_on_answers_only(tiny_dir):
    """schedule random with lo 1e-3, hi 1: one ratio per block; never the prompt or padding."""
    model, _ = _adapted(tiny_dir("ar"))
    fam = family_of(model)
    tokens = TokenBatch(
        torch.randint(10, 60, (64, 20)), torch.full((64,), 4), torch.full((64,), 15)
    )
    batch = make_batch(tokens, fam, NOISE, torch.Generator().manual_seed(1))
    assert not batch.masked[:, :4].any() and not batch.masked[:, 15:].any()
    p = batch.p_mask[:, 4:15]
    assert float(p.min()) >= 1e-3 and float(p.max()) < 1.0
    for k in range(3):  # one ratio per block of 4 answer tokens
        blk = p[:, 4 * k : min(4 * k + 4, 11)]
        assert bool((blk == blk[:, :1]).all())


def test_adapted_family_saves_and_reloads_as_plain_transformers(tiny_dir, tmp_path):
    model, tok = _adapted(tiny_dir("ar"))
    fam = family_of(model)
    assert (fam.name, fam.mask_token_id, fam.block_size) == ("fast_dllm_v2", tok.mask_token_id, 4)
    assert fam.shift_logits and not fam.causal
    save_model(model, tmp_path / "m", tokenizer=tok)
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (raw["model_type"], raw["bd_size"], raw["mask_token_id"]) == (
        "llama",
        4,
        fam.mask_token_id,
    )
    again, _ = load_model(tmp_path / "m")
    assert family_of(again) == fam
    ids = torch.randint(10, 60, (2, 12))
    valid = torch.ones_like(ids, dtype=torch.bool)
    attn = to_additive(block_causal_mask(block_ids(valid, torch.tensor([5, 3]), 4)))
    kw = {"input_ids": ids, "attention_mask": attn, "position_ids": position_ids(valid)}
    with torch.no_grad():
        want = model(**kw).logits
        assert torch.equal(again(**kw).logits, want)
        from transformers import AutoModelForCausalLM  # a user's load: stock transformers

        plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))
        assert plain.config.bd_size == 4 and plain.config.mask_token_id == fam.mask_token_id
        assert torch.allclose(plain(**kw).logits, want, atol=1e-5)


def test_mask_token_added_and_embeddings_grown(tiny_dir, tmp_path):
    """A tokenizer without a mask token gets |<MASK>| (Qwen2.5's); a full vocabulary grows."""
    model, tok = load_model(tiny_dir("ar"))
    raw = dict(family_of(model).original_config)
    tok.mask_token = None
    tok.add_special_tokens({"additional_special_tokens": []})
    raw["vocab_size"] = len(tok)
    small = build_model(raw, tokenizer=tok, seed=0)
    new_raw, tok = adapt_checkpoint(raw, tok, NOISE)
    assert tok.convert_ids_to_tokens(new_raw["mask_token_id"]) == "|<MASK>|"
    assert new_raw["vocab_size"] == len(tok) == raw["vocab_size"] + 1
    grown = adopt_config(small, new_raw, tok)
    assert grown.get_input_embeddings().weight.shape[0] == new_raw["vocab_size"]
    assert family_of(grown).mask_token_id == new_raw["mask_token_id"]
    with pytest.raises(ValueError, match="adapts an autoregressive checkpoint"):
        adapt_checkpoint({"model_type": "llada"}, tok, NOISE)
    with pytest.raises(ValueError, match="bd_size=4 but train.noise.block_size=8"):
        adapt_checkpoint(new_raw, tok, dataclasses.replace(NOISE, block_size=8))


def test_released_hub_format_is_read(tiny_dir, tmp_path):
    """model_type Fast_dLLM_Qwen (the hub checkpoint's) maps onto Qwen2 with its bd_size."""
    model, _ = load_model(tiny_dir("dream"))
    raw = dict(family_of(model).original_config)
    raw.update(model_type="Fast_dLLM_Qwen", bd_size=4, architectures=["Fast_dLLM_QwenForCausalLM"])
    spec = detect_spec(raw)
    assert spec.name == "fast_dllm_v2"
    assert spec.architecture(raw).__name__ == "Qwen2ForCausalLM"
    assert spec.facts(raw).block_size == 4
    assert detect_spec({**raw, "model_type": "qwen2", "bd_size": 4}).name == "fast_dllm_v2"
    del raw["bd_size"]
    assert detect_spec({**raw, "model_type": "qwen2"}).name == "ar"


@pytest.fixture(scope="module")
def sharp_adapted(tmp_path_factory):
    from d2f.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path_factory.mktemp("ar"), "ar")
    model, _ = _adapted(path, sharpen=40.0)
    with torch.no_grad():
        end = family_of(model).end_token_ids[0]
        model.lm_head.weight[end] += 2.0 * model.lm_head.weight.std()
    return model


def _prompts(n_list=(5, 9, 3)):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(10, 60, (n,), generator=g).tolist() for n in n_list]


@pytest.mark.parametrize("sbs", [2, 4])
def test_decodes_with_fast_dllm_v2_as_the_reference(sharp_adapted, sbs):
    """The adapted model (blocks of 4) through `fast_dllm_v2`: the tokens of the slow reference of
    tests/test_fast_dllm_v2.py (whole sequence recomputed, shifted logits, the AR first token)."""
    model, bs = sharp_adapted, 4
    for thr in (0.3, 0.9):
        cfg = DecodeConfig(
            strategy="fast_dllm_v2",
            block_size=bs,
            max_new_tokens=16,
            options={"sub_block_size": sbs, "threshold": thr},
        )
        out = generate(model, _prompts(), cfg)
        for p, got in zip(_prompts(), out.tokens, strict=True):
            assert got == v2_reference(model, p, bs, sbs, thr, 16)[0]


@pytest.mark.parametrize("strategy", ["d2f", "cache_only"])
def test_decodes_with_the_d2f_pipeline_as_its_reference(sharp_adapted, strategy):
    model = sharp_adapted
    kw = {"tau_add": 1.0} if strategy == "cache_only" else {"tau_add": 0.25, "tau_act": 0.75}
    cfg = DecodeConfig(block_size=4, max_new_tokens=16, tau_conf=0.6, **kw)
    ref = generate(model, _prompts(), cfg, strategy="reference")
    out = generate(model, _prompts(), cfg, strategy=strategy)
    assert out.tokens == ref.tokens
    assert any(r.tokens_with_end > r.forwards for r in out.stats.rows), "no parallel commit"


def test_bidirectional_strategies_refused(sharp_adapted):
    with pytest.raises(ValueError, match="trained block-causal"):
        generate(sharp_adapted, _prompts(), DecodeConfig(strategy="vanilla", block_size=4))
    with pytest.warns(UserWarning, match="trained with blocks of 4"):
        generate(sharp_adapted, _prompts(), DecodeConfig(strategy="cache_only", block_size=8))


def test_trains_from_ar_with_a_falling_loss(tiny_dir, tmp_path):
    run = tmp_path / "run"
    main(tiny_config(tiny_dir("ar"), run, *FDV2, "train.max_steps=40", "train.save_every=40",
                     "train.micro_batch_size=16", "train.lr=3e-3"))  # fmt: skip
    recs = read_metrics(run)
    assert mean(recs[-10:], "loss") < 0.7 * mean(recs[:10], "loss")
    assert all(math.isclose(r["loss"], r["view_masked"] + r["view_complement"], rel_tol=1e-5)
               for r in recs)  # fmt: skip
    model, _ = load_model(run / "checkpoint-000040" / "model")
    assert family_of(model).name == "fast_dllm_v2" and family_of(model).block_size == 4


def test_kill_and_resume_gives_the_uninterrupted_run(tiny_dir, tmp_path, monkeypatch):
    """fast_dllm_v2 killed inside step 7 and resumed: the same numbers at every step and the same
    weights (full fine-tuning) as one uninterrupted run (tests/train_helpers.py::kill_and_resume)."""
    kill_and_resume(
        "fast_dllm_v2",
        lambda out, *o: tiny_config(tiny_dir("ar"), out, *FDV2, "train.micro_batch_size=8", *o),
        tmp_path,
        monkeypatch,
        lora=False,
    )


def test_presets(tmp_path):
    from d2f.config import load_config

    big = load_config("fast_dllm_v2")
    assert big.model.path == "Qwen/Qwen2.5-7B-Instruct" and big.data.max_length == 512
    t = big.train
    assert (t.objective, t.lr, t.lr_schedule, t.micro_batch_size, t.grad_accum) == (
        "fast_dllm_v2",
        2e-5,
        "constant",
        1,
        1,
    )
    assert t.warmup_steps == round(0.03 * t.max_steps) and t.mixed_precision == "bf16"
    n = t.noise
    assert (n.schedule, n.block_size, n.lo, n.hi, n.mask_padding) == (
        "random",
        32,
        1e-3,
        1.0,
        False,
    )
    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "q", "answer": "a"}\n')
    tiny = load_config("tinyworld_fdv2", [f"data.sources=[{data}]"])
    assert tiny.model.path == "d2f/tinyworld/assets/chain/ar"
    assert (tiny.train.objective, tiny.train.noise.block_size) == ("fast_dllm_v2", 8)
