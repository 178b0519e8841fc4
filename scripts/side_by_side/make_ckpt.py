"""Write the sharpened tiny original-format checkpoints (LLaDA, Dream) under SCRATCH/ckpt (d2f's venv).

`d2f.tiny.write_tiny_checkpoint(seed=0)`, loaded by d2f, output layer scaled by 12 (as
`scripts/bench_decode.py` does) and by 60, written back with `save_model`: {family}_s12, _s60.
"""

import torch
from common import CKPT_ROOT

from d2f.models import load_model, save_model
from d2f.tiny import write_tiny_checkpoint

for fam in ("llada", "dream"):
    raw = write_tiny_checkpoint(CKPT_ROOT / f"{fam}_raw", fam, seed=0)
    for sharpen in (12, 60):
        model, tok = load_model(raw)
        with torch.no_grad():
            model.lm_head.weight.mul_(float(sharpen))
        print(fam, sharpen, save_model(model, CKPT_ROOT / f"{fam}_s{sharpen}", tokenizer=tok))
