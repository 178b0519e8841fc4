"""d2f's side of the Jacobi run (d2f's venv): `generate(strategy="jacobi")` and greedy `ar` on
the Qwen2 copy of the miniature world's AR model (`make_qwen2_ar.py`) and the held-out `add2`
questions, batch 1, for every setting of `jacobi_settings.py`; tokens and forwards (a forward
hook, checked against `stats.forwards`; the prefill counts as one).

    SBS_SCRATCH=DIR python scripts/side_by_side/ours_jacobi.py   # -> DIR/results/ours_jacobi.json
"""

import torch
from common import CKPT_ROOT, per_prompt, save
from jacobi_settings import GEN, N_PROMPTS, SETTINGS

from d2f.decoding import DecodeConfig, encode_prompts, generate
from d2f.family import family_of
from d2f.models import load_model
from d2f.tinyworld.task import problems


def main() -> None:
    torch.set_num_threads(1)
    path = CKPT_ROOT / "ar_qwen2"
    model, tok = load_model(path)
    family = family_of(model)
    ar = DecodeConfig(strategy="ar", block_size=1, max_new_tokens=GEN)
    ids = encode_prompts([p.question for p in problems("add2", "test", N_PROMPTS)], tok, family, ar)
    out = {"ckpt": str(path), "gen": GEN, "ids": ids, "end_ids": list(family.end_token_ids)}
    out |= {"pad_id": family.pad_token_id, "runs": {}}
    todo = [("ar", ar)] + [
        (name, DecodeConfig(strategy="jacobi", block_size=1, max_new_tokens=GEN, options=o))
        for name, o in SETTINGS
    ]
    for name, cfg in todo:
        rows = out["runs"][name] = per_prompt(model, generate, ids, cfg)
        print(f"d2f {name}: {sum(r['forwards'] for r in rows)} forwards, {len(ids)} prompts")
    save("ours_jacobi", out)


if __name__ == "__main__":
    main()
