"""d2f's side of the dInfer run (d2f's venv): `generate(strategy="dinfer")` on the miniature
world's teacher (LLaDA format) and its held-out `add2` questions, or a tiny random LLaDA with
random prompts (`DINFER_CKPT`, see `dinfer_settings.py`), batch 1, for every setting of
`dinfer_settings.py`; tokens and forwards (a forward hook, checked against `stats.forwards`).
Also writes the teacher's logits on a few full sequences for the peer side's model check.

    SBS_SCRATCH=DIR python scripts/side_by_side/ours_dinfer.py   # -> DIR/results/ours_dinfer_{CKPT}.json
    (DINFER_KV=static: d2f's static KV cache, -> ours_dinfer_{CKPT}_static.json)
"""

from pathlib import Path

import torch
from common import CKPT_ROOT, FIRST_ID, per_prompt, result_path, save
from dinfer_settings import BLOCK, CKPT, GEN, KV, N_PROMPTS, OURS, SETTINGS

from d2f.decoding import DecodeConfig, encode_prompts, generate
from d2f.family import family_of
from d2f.models import load_model
from d2f.tinyworld.task import problems

TEACHER = Path(__file__).resolve().parents[2] / "d2f/tinyworld/assets/teacher"


def main() -> None:
    torch.set_num_threads(1)
    path = TEACHER if CKPT == "teacher" else CKPT_ROOT / f"llada_{CKPT}"
    model, tok = load_model(path)
    family = family_of(model)
    base = DecodeConfig(strategy="dinfer", block_size=BLOCK, max_new_tokens=GEN)
    if CKPT == "teacher":
        questions = [p.question for p in problems("add2", "test", N_PROMPTS)]
        ids = encode_prompts(questions, tok, family, base)
    else:  # random non-special ids, 5-16 of them
        g = torch.Generator().manual_seed(2026)
        n_tok, lo = len(tok.get_vocab()) - len(tok.get_added_vocab()), FIRST_ID["llada"]
        lengths = torch.randint(5, 17, (N_PROMPTS,), generator=g).tolist()
        ids = [torch.randint(lo, n_tok, (n,), generator=g).tolist() for n in lengths]
    # the model check: full sequences (prompt + random answer ids, some masks) -> logits
    g = torch.Generator().manual_seed(0)
    probe = [p + torch.randint(3, model.config.vocab_size, (GEN,), generator=g).tolist()
             for p in ids[:8]]  # fmt: skip
    for p in probe:
        p[-GEN::3] = [family.mask_token_id] * len(p[-GEN::3])
    with torch.no_grad():
        logits = [model(torch.tensor([p])).logits[0] for p in probe]
    torch.save({"ids": probe, "logits": logits}, result_path(f"dinfer_logits_{CKPT}", "pt"))
    out = {"ckpt": str(path), "block": BLOCK, "gen": GEN, "ids": ids}
    out |= {"mask_id": family.mask_token_id, "end_ids": list(family.end_token_ids), "runs": {}}
    for name, opts in SETTINGS:
        cfg = DecodeConfig(
            strategy="dinfer", block_size=BLOCK, max_new_tokens=GEN, options=opts, kv_cache=KV
        )
        rows = out["runs"][name] = per_prompt(model, generate, ids, cfg)
        total = sum(r["forwards"] for r in rows)
        print(f"d2f dinfer {name} ({KV}): {total} forwards, {len(ids)} prompts")
    save(OURS, out)


if __name__ == "__main__":
    main()
