"""Helpers of the decoding tests."""

import torch

from d2f.family import family_of
from d2f.models import load_model
from d2f.tiny import write_tiny_checkpoint


class Counter:
    """Counts model calls with a forward hook (independent of the decoder's own count), and
    keeps the (rows, columns) of each call's logits in `shapes`."""

    def __init__(self, model):
        self.calls = 0
        self.shapes: list[tuple[int, int]] = []
        self.handle = model.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.calls += 1
        logits = getattr(output, "logits", None)
        if logits is not None:
            self.shapes.append(tuple(logits.shape[:2]))

    def reset(self):
        self.calls = 0
        self.shapes = []


def random_prompts(n_list=(5, 9, 3), seed=0) -> list[list[int]]:
    """Ragged random prompts: one list of ids in [10, 100) per length in `n_list`, seeded."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 100, (n,), generator=g).tolist() for n in n_list]


def confident_models(tmp_path_factory) -> dict:
    """Tiny random LLaDA, Dream and AR checkpoints loaded as {family: (model, tokenizer)}; the dLLMs
    are made confident (lm_head x12) and Dream's end token likelier, so that thresholds, parallel
    commits, several blocks in flight and rows ending at different steps really happen."""
    made = {}
    for fam in ("llada", "dream", "ar"):
        path = write_tiny_checkpoint(tmp_path_factory.mktemp(fam), fam)
        model, tok = load_model(path)
        if fam != "ar":
            with torch.no_grad():
                model.lm_head.weight.mul_(12.0)
                end = family_of(model).end_token_ids[0]
                bias = {"llada": 0.0, "dream": 0.2}[fam]  # chosen so that some rows end early
                model.lm_head.weight[end] += bias * model.lm_head.weight.std() * 12
        made[fam] = (model, tok)
    return made
