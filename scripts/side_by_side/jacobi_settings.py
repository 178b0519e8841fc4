"""Settings of the Jacobi side-by-side run, shared by d2f's venv and the peer venv (stdlib only).

Each setting is a name and d2f's `JacobiOptions` fields (chunk n, blocks K, pool_size, spawn
ratio r); the released function takes the same four (`n_token_seq_len`, `K`, `n_gram_pool_size`,
`r`). `GEN` new tokens (a multiple of every chunk below 64), batch 1, greedy.
"""

import os

GEN = int(os.environ.get("JACOBI_GEN", "24"))
N_PROMPTS = int(os.environ.get("JACOBI_N", "100"))  # held-out `add2` questions of the tiny world

SETTINGS = [
    ("plain n4", {"chunk": 4, "blocks": 1, "pool_size": 0}),
    ("plain n8", {"chunk": 8, "blocks": 1, "pool_size": 0}),
    ("recycling n8 pool 4", {"chunk": 8, "blocks": 1, "pool_size": 4}),
    ("recycling n4 pool 4", {"chunk": 4, "blocks": 1, "pool_size": 4}),
    ("multi-block n8 K2", {"chunk": 8, "blocks": 2, "pool_size": 0}),
    ("multi-block n8 K2 pool 4", {"chunk": 8, "blocks": 2, "pool_size": 4}),
    ("README n64 K2 pool 4", {"chunk": 64, "blocks": 2, "pool_size": 4}),
]
for _, o in SETTINGS:
    o.setdefault("spawn_ratio", 0.85)
