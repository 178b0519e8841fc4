"""Paths, prompts and settings shared by both sides of the side-by-side run.

Imported from the peers' venvs and from d2f's, so it uses the standard library and torch only.
Every path is under the scratch directory `$SBS_SCRATCH` (set by `run.sh`); `$SHARPEN` picks the
checkpoint (12, 60 or 60eos: see `make_ckpt.py`, `make_eos_ckpt.py`).
"""

import json
import os
import sys
import time
from pathlib import Path

import torch

if "SBS_SCRATCH" not in os.environ:
    raise SystemExit("set SBS_SCRATCH to the scratch directory (run.sh does)")
SCRATCH = Path(os.environ["SBS_SCRATCH"]).resolve()
SHARPEN = os.environ.get("SHARPEN", "60")
CKPT_ROOT = SCRATCH / "ckpt"
CKPT = {f: str(CKPT_ROOT / f"{f}_s{SHARPEN}") for f in ("llada", "dream")}
# The peers' checkouts (setup.sh): NVlabs/Fast-dLLM, the fork wangziyannb/Fast-dLLM, d3LLM.
FASTDLLM, FASTDLLM_FORK, D3LLM = (str(SCRATCH / n) for n in ("fastdllm", "fastdllm-fork", "d3llm"))

GEN_LENGTH, BLOCK = 32, 8  # new tokens, block size (4 blocks), every method

# Fast-dLLM v1 / d3LLM prompts: random non-special ids in [FIRST_ID, vocabulary size).
LENGTHS = (5, 9, 13, 7, 11)
FIRST_ID = {"llada": 7, "dream": 4}  # above LLaDA's 7 special ids; Dream's specials sit at the end
# Fast-dLLM v2 prompts: multiples of the block and longer than one block (their prefill needs
# min_len > block_size), so their block layout (from position 0) and d2f's start on one boundary.
LENGTHS_V2 = (16, 24, 16, 24, 32)


def n_tokens(ckpt: str) -> int:
    """Size of the tokenizer's base vocabulary (added special tokens excluded)."""
    return len(json.loads(Path(ckpt, "tokenizer.json").read_text())["model"]["vocab"])


def prompts(family: str, n_tok: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(FIRST_ID[family], n_tok, (n,), generator=g).tolist() for n in LENGTHS]


def prompts_v2(n_tok: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(4321)
    return [torch.randint(FIRST_ID["dream"], n_tok, (n,), generator=g).tolist() for n in LENGTHS_V2]


def result_path(name: str, ext: str = "json") -> Path:
    """SCRATCH/results/NAME.EXT, e.g. `theirs_fastdllm_s60.json`, `ours_fastdllm_s60.json`."""
    (SCRATCH / "results").mkdir(parents=True, exist_ok=True)
    return SCRATCH / "results" / f"{name}.{ext}"


def save(name: str, obj) -> None:
    result_path(name).write_text(json.dumps(obj))


def load(name: str):
    return json.loads(result_path(name).read_text())


def per_prompt(model, generate, ids: list[list[int]], cfg) -> list[dict]:
    """d2f's side of a run: each prompt decoded alone by `generate` (d2f's, passed in: this module
    imports no d2f), its tokens and its model calls (a forward hook, checked to equal DecodeStats)."""
    calls = [0]
    hook = model.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    rows = []
    try:
        for p in ids:
            calls[0] = 0
            o = generate(model, [p], cfg)
            assert calls[0] == o.stats.forwards, (calls[0], o.stats.forwards)
            rows.append({"tokens": o.tokens[0], "forwards": calls[0]})
    finally:
        hook.remove()
    return rows


def serve(handlers: dict) -> None:
    """A persistent worker (`speed.py`): one JSON request per stdin line, `{"cmd": name, ...}`, is
    answered by `handlers[name](**rest)` as one JSON line on the original stdout; whatever the
    code under test prints goes to stderr, so it cannot corrupt the replies."""
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for line in sys.stdin:
        request = json.loads(line)
        reply.write(json.dumps(handlers[request.pop("cmd")](**request)) + "\n")
        reply.flush()


def timed(fn):
    """fn() -> (its result, wall seconds, this thread's CPU seconds)."""
    w, c = time.perf_counter(), time.thread_time()
    out = fn()
    return out, time.perf_counter() - w, time.thread_time() - c
