"""d2f's side of `speed.py`: a persistent worker in d2f's venv (`PYTHONPATH=.:scripts/side_by_side`).

The miniature world's held-out questions (`problems(level, "test", n)`, the chat template and one
BOS as the quickstart's race and the lm-eval model encode them) decoded by `generate` at batch 1
with the quickstart's D2F settings for the world's student (`quickstart.d2f_decode`), on the
world's shipped teacher alone (`base`) or with a LoRA adapter loaded the way d2f's inference entry
points load it (`merged`, their default) or kept as a peft `PeftModel` (`unmerged`).
Model calls: `DecodeStats.forwards` (a forward hook checks it). Requests (`common.serve`): `setup`,
`decode`, `call`; see `speed.py`.
"""

import torch
from common import serve, timed

from d2f.decoding import DecodeConfig, generate
from d2f.decoding.common import Batch, Recorder, forward
from d2f.decoding.kv import keep_columns, make_cache
from d2f.family import family_of
from d2f.mask import block_causal_mask, block_ids
from d2f.models import load_model
from d2f.tinyworld.pretrain import assets_dir
from d2f.tinyworld.quickstart import SIZES, d2f_decode
from d2f.tinyworld.race import prompt_ids
from d2f.tinyworld.task import problems
from d2f.tinyworld.world import WORLDS

STATE = {}


def setup(world: str, n: int, adapter: str | None, variants: list, overrides: dict) -> dict:
    """Load one model per variant; returns the prompts, the settings and the family's ids."""
    torch.set_num_threads(1)
    base = str(assets_dir(world) / "teacher")
    # a tensor counter: a hook that updates a Python int is specialized on the int's value by
    # torch.compile (a recompile per call under `compile`); an in-place add is traced as one op
    models, calls = {}, torch.zeros((), dtype=torch.long)

    def count(*args):
        calls.add_(1)  # returns None: a forward hook's return value would replace the output

    for variant in variants:
        model, tok = load_model(
            base,
            adapter=None if variant == "base" else adapter,
            merge_adapter=variant == "merged",
        )
        model.register_forward_hook(count)
        models[variant] = model
    settings = d2f_decode(SIZES[world])
    cfg = DecodeConfig(strategy="d2f", **settings, **overrides)
    prompts = [prompt_ids(tok, p.question) for p in problems(WORLDS[world].level, "test", n)]
    family = family_of(models[variants[0]])
    STATE.update(models=models, calls=calls, cfg=cfg, family=family)
    return {
        "base": base,
        "prompts": prompts,
        "settings": settings,
        "config": repr(cfg),
        "mask_id": family.mask_token_id,
        "end_ids": list(family.end_token_ids),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def decode(variant: str, prompt: list) -> dict:
    """One prompt through `generate`: its tokens (cut before the first end id), calls, time."""
    model, calls = STATE["models"][variant], STATE["calls"]
    calls.zero_()
    out, wall, cpu = timed(lambda: generate(model, [prompt], STATE["cfg"]))
    assert int(calls) == out.stats.forwards, (int(calls), out.stats.forwards)
    row = out.stats.rows[0]
    return {
        "tokens": out.tokens[0],
        "hit_end": row.hit_end,
        "calls": int(calls),
        "wall": wall,
        "cpu": cpu,
    }


def call(variant: str, prompt: list, cached: bool, reps: int) -> dict:
    """`reps` model calls as `d2f_decode` makes them (`common.forward`, the block-causal mask):
    `[prompt | block 1]` over an empty cache (the first step), or block 1 alone over the
    prompt's cache (cropped back after each call, outside the timing)."""
    model, cfg, family = STATE["models"][variant], STATE["cfg"], STATE["family"]
    P, bs = len(prompt), cfg.block_size
    batch = Batch.create([prompt], bs, family.mask_token_id, family.pad_token_id, "cpu")
    ids = block_ids(batch.valid, torch.tensor([P]), bs)  # (1, P + bs)
    rec = Recorder(1, bs, "cpu")
    start = P if cached else 0
    mask = block_causal_mask(ids, start)  # (1, P + bs - start, P + bs)
    walls, cpus = [], []
    with torch.inference_mode():  # as `generate` runs the decoders
        cache = make_cache(model, cfg.kv_cache, P + bs)
        if cached:
            forward(model, rec, batch, block_causal_mask(ids, 0, P)[..., :P], 0, P, cache)
        for _ in range(reps):
            logits, wall, cpu = timed(
                lambda: forward(model, rec, batch, mask, start, P + bs, cache)
            )
            keep_columns(cache, start)
            walls.append(wall)
            cpus.append(cpu)
    return {"wall": walls, "cpu": cpus, "logits": logits[0, -bs:].tolist()}


if __name__ == "__main__":
    serve({"setup": setup, "decode": decode, "call": call})
