"""d2f's side of the per-prompt model-call count against the D2F authors' loop (d2f's venv).

The miniature world's teacher (`d2f/tinyworld/assets/teacher`), its 200 held-out `add2` questions
(chat template, d2f's encoding, 25-27 tokens), batch 1, blocks of 4, 24 new tokens, tau_add 0.5,
tau_act 0.95, tau_conf 0.9, greedy; strategies `d2f` and `cache_only`. Writes the prompt ids, the
family's mask / end ids, and per prompt d2f's tokens and forwards (counted by a forward hook, and
checked against `stats.forwards`) for `theirs_d2f_calls.py`:

    SBS_SCRATCH=DIR python scripts/side_by_side/ours_d2f_calls.py   # -> DIR/results/ours_d2f_calls.json
"""

from pathlib import Path

import torch
from common import save

from d2f.decoding import DecodeConfig, encode_prompts, generate
from d2f.family import family_of
from d2f.models import load_model
from d2f.tinyworld.task import problems

TEACHER = Path(__file__).resolve().parents[2] / "d2f/tinyworld/assets/teacher"
SETTINGS = {"block_size": 4, "max_new_tokens": 24, "tau_add": 0.5, "tau_act": 0.95, "tau_conf": 0.9}


def main() -> None:
    torch.set_num_threads(1)
    model, tok = load_model(TEACHER)
    family = family_of(model)
    cfg = DecodeConfig(**SETTINGS)
    ids = encode_prompts([p.question for p in problems("add2", "test", 200)], tok, family, cfg)
    calls = [0]
    model.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    out = {"teacher": str(TEACHER), "settings": SETTINGS, "ids": ids}
    out |= {"mask_id": family.mask_token_id, "end_ids": list(family.end_token_ids)}
    for strategy in ("d2f", "cache_only"):
        rows = []
        for p in ids:
            calls[0] = 0
            o = generate(model, [p], cfg, strategy=strategy)
            assert calls[0] == o.stats.forwards, (calls[0], o.stats.forwards)
            rows.append(
                {"tokens": o.tokens[0], "hit_end": o.stats.rows[0].hit_end, "calls": calls[0]}
            )
        out[strategy] = rows
        print(f"d2f {strategy}: {sum(r['calls'] for r in rows)} calls for {len(ids)} prompts")
    save("ours_d2f_calls", out)


if __name__ == "__main__":
    main()
