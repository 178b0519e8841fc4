"""The x60 LLaDA checkpoint made to predict the end token, so early stop is exercised (d2f's venv).

Its end token's output row := 1.02 x the row of the answer token that the released Fast-dLLM v1
LLaDA functions produce most often at x60 (needs `theirs_fastdllm_s60` from `theirs_llada.py`).
Writes SCRATCH/ckpt/llada_s60eos.
"""

import collections

import torch
from common import CKPT_ROOT, load

from d2f.models import load_model, save_model

theirs = load("theirs_fastdllm_s60")
counts = collections.Counter(
    t for rows in theirs["runs"].values() for r in rows for t in r["answer"]
)
top = counts.most_common(1)[0][0]
model, tok = load_model(CKPT_ROOT / "llada_s60")
with torch.no_grad():
    W = model.lm_head.weight
    W[tok.eos_token_id] = 1.02 * W[top]
save_model(model, CKPT_ROOT / "llada_s60eos", tokenizer=tok)
print("eos", tok.eos_token_id, "copied from", top, counts.most_common(3))
