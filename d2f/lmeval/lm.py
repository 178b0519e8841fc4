"""The lm-eval model `d2f`: any d2f decoding strategy behind lm-eval's `LM` interface.

    python -m d2f.eval --model d2f --model_args pretrained=PATH_OR_ID,adapter=...,dtype=bfloat16,\\
        strategy=d2f,block_size=32,tau_add=0.1,tau_act=0.95,tau_conf=0.9,max_new_tokens=512 \\
        --tasks gsm8k --batch_size 4 --output_path out/gsm8k --log_samples

Model args: `pretrained`, `adapter`, `merge_adapter` (default true: LoRA folded into the weights for
speed), `dtype`, `device`, `attn_implementation`, `mc_samples` (loglikelihood), `seed`, `add_bos`,
`stats_dir` (set by `python -m d2f.eval` from --output_path),
and every `DecodeConfig` field (`strategy` picks D2F or a baseline).

- `generate_until`: batches of `--batch_size` prompts of one task through `d2f.generate`; text cut
  at the first `until` string. `max_new_tokens` from the model args wins over the task's
  `max_gen_toks` (the paper's settings fix the generation cap); it is at least one block.
- `loglikelihood`: the Monte-Carlo masked-diffusion estimate (LLaDA's): for n stratified mask
  counts k in [1, L] over the L continuation tokens, mask k of them at random, one bidirectional
  forward, sum the cross-entropy at the masked positions, weight by L / k; the log-likelihood is
  minus the mean. It is an ELBO estimate (a lower bound in expectation), not an exact likelihood.
  `is_greedy`: argmax equals the continuation at every position with the whole continuation masked.
- `loglikelihood_rolling` (perplexity tasks) is not supported: it raises.
- Data parallel under `accelerate launch`: ranks, gather and barrier through accelerate.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from d2f.decoding import DecodeConfig, generate
from d2f.family import family_of
from d2f.lmeval.stats import SpeedLog
from d2f.mask import block_ids, full_mask, to_additive
from d2f.models import load_model
from d2f.paths import is_local, missing

_DECODE_FIELDS = {f.name for f in dataclasses.fields(DecodeConfig)}


def cut_at_stop(text: str, until: list[str]) -> str:
    """The text before the earliest occurrence of any stop string."""
    cut = len(text)
    for stop in until:
        if stop:
            i = text.find(stop)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


def count_prefix_tokens(tokenizer, ids: list[int], n_chars: int) -> int:
    """Fewest leading ids whose decoded text has at least n_chars characters (binary search)."""
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(ids[:mid], skip_special_tokens=True)) >= n_chars:
            hi = mid
        else:
            lo = mid + 1
    return lo


@register_model("d2f")
class D2FLM(TemplateLM):
    def __init__(
        self,
        pretrained: str,
        adapter: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        batch_size: int | str = 1,
        attn_implementation: str | None = None,
        mc_samples: int = 32,
        seed: int = 0,
        add_bos: bool | None = None,
        merge_adapter: bool = True,
        stats_dir: str | None = None,
        max_batch_size: int | None = None,  # lm-eval passes it; unused
        **decode_kwargs,
    ):
        super().__init__()
        unknown = sorted(set(decode_kwargs) - _DECODE_FIELDS)
        if unknown:
            raise ValueError(f"d2f model_args: unknown {unknown}; known: {sorted(_DECODE_FIELDS)}")
        decode_kwargs.setdefault("truncate_prompt", True)  # as the published eval: keep the end
        self.decode = DecodeConfig(**decode_kwargs)
        self._user_decode_keys = set(decode_kwargs)
        if str(batch_size).startswith("auto"):
            raise ValueError("d2f: batch_size=auto is not supported; give an integer")
        self.batch_size = int(batch_size)
        if adapter is not None and is_local(adapter) and not Path(adapter).is_dir():
            raise FileNotFoundError(f"d2f: adapter {missing(adapter)}")
        from accelerate import PartialState

        # NOTE: PartialState ignores ACCELERATE_USE_CPU: without cpu=True a CPU-only multi-process
        # launch silently runs every rank on the whole task as a single process.
        state = PartialState(cpu=not torch.cuda.is_available())
        self._state = state
        self._rank, self._world_size = state.process_index, state.num_processes
        if self._world_size > 1:
            device = state.device  # one device per rank, as accelerate assigned it
        elif device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            # NOTE: lm-eval's --device defaults to cuda; on a CPU-only machine run on the CPU
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        self.model, self.tokenizer = load_model(
            pretrained,
            adapter=adapter,
            dtype=dtype,
            device=device,
            attn_implementation=attn_implementation,
            merge_adapter=merge_adapter,
        )
        if self.tokenizer is None:
            raise ValueError(f"{pretrained}: no tokenizer files; lm-eval needs a tokenizer")
        self.family = family_of(self.model)
        self.add_bos = self.tokenizer.bos_token_id is not None if add_bos is None else add_bos
        self.mc_samples = int(mc_samples)
        self.seed = int(seed)
        self.stats_dir = stats_dir
        self.model_args = {
            "pretrained": str(pretrained),
            "adapter": adapter,
            "dtype": dtype,
            "batch_size": self.batch_size,
            **dataclasses.asdict(self.decode),
        }
        self.speed = SpeedLog()

    # ---- lm-eval plumbing -------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.family.end_token_ids[0]

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt=True
    ) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        return self.tokenizer(string, add_special_tokens=False)["input_ids"]

    def all_gather(self, tensor):
        if self._world_size <= 1:
            return tensor
        from accelerate.utils import gather

        return gather(tensor)

    def gather_object(self, obj, dst=0):
        if self._world_size <= 1:
            return [obj]
        result = [None] * self._world_size if self._rank == dst else None
        torch.distributed.gather_object(obj=obj, object_gather_list=result, dst=dst)
        return result

    def barrier(self) -> None:
        if self._world_size > 1:
            self._state.wait_for_everyone()

    # ---- generation ------------------------------------------------------------------------
    def _prompt_ids(self, context: str) -> list[int]:
        """Context ids with exactly one BOS (a chat-templated context already starts with it)."""
        ids = self.tok_encode(context)
        bos = self.tokenizer.bos_token_id
        if self.add_bos and bos is not None and ids[:1] != [bos]:
            ids = [bos] + ids
        return ids

    def _config(self, gen_kwargs: dict) -> DecodeConfig:
        changes = {}
        if "max_new_tokens" not in self._user_decode_keys:
            budget = int(gen_kwargs.get("max_gen_toks", self.decode.max_new_tokens))
            changes["max_new_tokens"] = max(budget, self.decode.block_size)
        if "temperature" not in self._user_decode_keys and gen_kwargs.get("do_sample"):
            changes["temperature"] = float(gen_kwargs.get("temperature", 1.0))
        return dataclasses.replace(self.decode, **changes)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            gen_kwargs = dict(req.args[1])
            groups[(req.task_name, json.dumps(gen_kwargs, sort_keys=True, default=str))].append(i)
        seen: set[tuple] = set()  # lm-eval pads ranks with copies: count each request once
        bar = tqdm(
            total=len(requests), desc=f"d2f generate (rank {self._rank})", disable=disable_tqdm
        )
        for (task, kwargs_json), idx in groups.items():
            gen_kwargs = json.loads(kwargs_json)
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            cfg = self._config(gen_kwargs)
            idx.sort(key=lambda i: -len(requests[i].args[0]))  # similar lengths batch together
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                prompts = [self._prompt_ids(requests[i].args[0]) for i in chunk]
                t0 = time.perf_counter()
                out = generate(self.model, prompts, cfg)
                texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in out.tokens]
                wall = time.perf_counter() - t0
                rows = []
                for i, ids, text, row in zip(chunk, out.tokens, texts, out.stats.rows, strict=True):
                    kept = cut_at_stop(text, until)
                    results[i] = kept
                    if len(kept) < len(text):  # cut by a stop string: count the ids that made it
                        n = count_prefix_tokens(self.tokenizer, ids, len(kept))
                        counted = (n, n, row.forwards)
                    else:
                        counted = (row.tokens, row.tokens_with_end, row.forwards)
                    key = (requests[i].task_name, requests[i].doc_id, requests[i].idx)
                    if key not in seen:
                        seen.add(key)
                        rows.append(counted)
                    self.cache_hook.add_partial("generate_until", requests[i].args, kept)
                self.speed.tasks[task].add_call(wall * len(rows) / len(chunk), rows)
                bar.update(len(chunk))
        bar.close()
        self._write_speed()
        return results

    def _write_speed(self) -> None:
        states = self.gather_object(self.speed.state(), dst=0)
        if self.stats_dir is None:
            return
        out = Path(self.stats_dir)
        out = out.parent if out.suffix == ".json" else out
        SpeedLog.write(
            out / f"d2f_speed_rank{self._rank}.json",
            SpeedLog.merged([self.speed.state()], self.model_args),
        )
        if self._rank == 0:
            SpeedLog.write(out / "d2f_speed.json", SpeedLog.merged(states, self.model_args))

    # ---- likelihood ------------------------------------------------------------------------
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        mask_id = self.family.mask_token_id
        if mask_id is None:
            raise ValueError("loglikelihood needs a dLLM with a mask token")
        gen = torch.Generator().manual_seed(self.seed)
        context = getattr(self.model.config, "max_position_embeddings", 4096)
        out = []
        for _, ctx, cont in tqdm(requests, desc="d2f loglikelihood", disable=disable_tqdm):
            ctx = ctx[-(context - len(cont)) :] if len(ctx) + len(cont) > context else ctx
            out.append(self._mc_loglikelihood(ctx, cont, mask_id, gen))
            self.cache_hook.add_partial("loglikelihood", None, out[-1])
        return out

    def _mc_loglikelihood(
        self, ctx: list[int], cont: list[int], mask_id: int, gen
    ) -> tuple[float, bool]:
        n, L, P = self.mc_samples, len(cont), len(ctx)
        x = torch.tensor(ctx + cont, device=self._device)  # (P + L,)
        # stratified mask counts k_i in [1, L] (low-variance, as LLaDA's estimator)
        u = torch.rand((), generator=gen)
        k = (1 + ((torch.arange(n) + u) / n * L).floor().long()).clamp(max=L)  # (n,)
        ranks = torch.rand(n, L, generator=gen).argsort(1).argsort(1)  # random order per sample
        masked = ranks < k[:, None]  # (n, L): k_i masked positions each
        batch = torch.cat(
            [
                torch.zeros(n + 1, P, dtype=torch.bool),
                torch.cat([masked, torch.ones(1, L, dtype=torch.bool)]),
            ],
            1,
        ).to(self._device)  # + all-masked row
        ids = torch.where(batch, mask_id, x[None])  # (n + 1, P + L)
        valid = torch.ones_like(ids, dtype=torch.bool)
        attn = full_mask(block_ids(valid, torch.full((n + 1,), P + L, device=self._device), 1))
        dtype = next(self.model.parameters()).dtype
        logits = self.model(
            input_ids=ids,
            attention_mask=to_additive(attn, dtype),
            position_ids=torch.arange(P + L, device=self._device)[None],
        ).logits
        if self.family.shift_logits:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], 1)
        logp = logits[:, P:].float().log_softmax(-1)  # (n + 1, L, V)
        target = x[P:][None].expand(n + 1, L)
        token_ll = logp.gather(-1, target[..., None])[..., 0]  # (n + 1, L)
        per_sample = (token_ll[:n] * masked.to(self._device)).sum(1) * (L / k.to(self._device))
        greedy = bool((logp[-1].argmax(-1) == x[P:]).all())
        return float(per_sample.mean()), greedy

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(
            "d2f: loglikelihood_rolling (perplexity tasks such as wikitext) is not defined for "
            "masked diffusion models here; use generation or multiple-choice (loglikelihood) tasks"
        )
