"""Settings of the dInfer side-by-side run, shared by d2f's venv and the peer venv (stdlib only).

Each setting is a name and d2f's `DInferOptions` fields (`theirs_dinfer.py` maps them onto the
released classes). Lengths: blocks of `BLOCK`, `GEN` new tokens (3 blocks), batch 1, greedy.
"""

import os

BLOCK = int(os.environ.get("DINFER_BLOCK", "8"))
GEN = int(os.environ.get("DINFER_GEN", "24"))
N_PROMPTS = int(os.environ.get("DINFER_N", "100"))  # held-out `add2` questions of the tiny world
# the checkpoint: "teacher" (the miniature world's, trained, LLaDA format; its held-out questions)
# or "s12" / "s60" (make_ckpt.py's tiny random LLaDA, output x12 / x60; random prompts)
CKPT = os.environ.get("DINFER_CKPT", "teacher")
THRESHOLD, LOW_THRESHOLD = 0.9, 0.3  # d2f's defaults = the authors' benchmark defaults
# d2f's `kv_cache` ("dynamic" or "static": keys in column order, as theirs); a static run's
# results are `ours_dinfer_{CKPT}_static`, compared with the same `theirs_dinfer_{CKPT}`
KV = os.environ.get("DINFER_KV", "dynamic")
OURS = f"ours_dinfer_{CKPT}" + ("" if KV == "dynamic" else f"_{KV}")

VIC = {"cache": "vicinity"}
SETTINGS = [
    ("threshold none", {"decoder": "threshold", "cache": "none"}),
    ("threshold prefix", {"decoder": "threshold", "cache": "prefix"}),
    ("threshold dual", {"decoder": "threshold", "cache": "dual"}),
    ("credit none", {"decoder": "credit", "cache": "none"}),
    ("credit dual", {"decoder": "credit", "cache": "dual"}),
    ("hierarchy none", {"decoder": "hierarchy", "cache": "none"}),
    ("hierarchy dual", {"decoder": "hierarchy", "cache": "dual"}),
    ("vicinity 0/0/0", VIC | {"prefix_look": 0, "after_look": 0, "warmup_steps": 0}),
    ("vicinity 3/5/0", VIC | {"prefix_look": 3, "after_look": 5, "warmup_steps": 0}),
    ("vicinity 3/5/2", VIC | {"prefix_look": 3, "after_look": 5, "warmup_steps": 2}),
    ("vicinity 16/16/4", VIC | {"prefix_look": 16, "after_look": 16, "warmup_steps": 4}),
    ("smoothing none", {"smoothing": True, "cache": "none"}),
    ("smoothing prefix", {"smoothing": True, "cache": "prefix"}),
    ("smoothing dual", {"smoothing": True, "cache": "dual"}),
    ("smoothing vicinity 3/5/2", VIC | {"smoothing": True, "prefix_look": 3, "after_look": 5,
                                        "warmup_steps": 2}),
    ("smoothing credit dual", {"smoothing": True, "decoder": "credit", "cache": "dual"}),
]  # fmt: skip
