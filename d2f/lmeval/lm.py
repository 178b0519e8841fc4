"""The lm-eval model `d2f`: any d2f decoding strategy behind lm-eval's `LM` interface.

    python -m d2f.eval --model d2f --model_args pretrained=PATH_OR_ID,adapter=...,dtype=bfloat16,\\
        strategy=d2f,block_size=32,tau_add=0.1,tau_act=0.95,tau_conf=0.9,max_new_tokens=512 \\
        --tasks gsm8k --batch_size 4 --output_path out/gsm8k --log_samples

Model args: `pretrained`, `adapter`, `merge_adapter` (default true: LoRA folded into the weights for
speed), `dtype`, `device`, `attn_implementation`, `mc_samples` (loglikelihood), `seed`, `add_bos`,
`stats_dir` (set by `python -m d2f.eval` from --output_path),
and every `DecodeConfig` field (`strategy` picks D2F or a baseline). A strategy's own settings
come as `options.KEY=VALUE` (e.g. `strategy=fast_dllm,options.cache=dual,options.threshold=0.9`),
typed by the strategy's options class (`d2f.decoding.config.parse_options`).

- Construction checks every argument, reads config.json and the tokenizer, and checks the strategy
  against the model family; the weights load at the first request, so lm-eval's own checks of the
  tasks (unknown task, empty data, unsafe code without `--confirm_run_unsafe_code`) fail first.
- `generate_until`: lm-eval's `Collator` groups the requests by task and generation settings and
  sorts them by length; batches of `--batch_size` prompts go through `d2f.generate`; text cut at
  the first `until` string. `max_new_tokens` from the model args wins over the task's
  `max_gen_toks` (the paper's settings fix the generation cap); it is at least one block.
- `loglikelihood`: the Monte-Carlo masked-diffusion estimate (LLaDA's): for n stratified mask
  counts k in [1, L] over the L continuation tokens, mask k of them at random, one bidirectional
  forward, sum the cross-entropy at the masked positions, weight by L / k; the log-likelihood is
  minus the mean. It is an ELBO estimate (a lower bound in expectation), not an exact likelihood.
  The draws come from a generator seeded by a hash of (seed, context ids, continuation ids), so a
  request's estimate does not depend on its rank, its batch or the order it comes in.
  `is_greedy`: argmax equals the continuation at every position with the whole continuation masked.
- A context gets exactly one BOS, in generation and in loglikelihood alike.
- `loglikelihood_rolling` (perplexity tasks) is not supported: it raises.
- Data parallel under `accelerate launch`: ranks, gather and barrier through accelerate.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import time
from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator
from tqdm import tqdm

from d2f.config import check_attention
from d2f.decoding import DecodeConfig, generate
from d2f.decoding.api import CAUSAL_STRATEGIES
from d2f.decoding.config import parse_options
from d2f.family import Family, detect_spec
from d2f.lmeval.stats import SpeedLog
from d2f.mask import block_ids, full_mask, to_additive
from d2f.models import load_model, load_tokenizer, read_config
from d2f.paths import is_local, missing

_DECODE_FIELDS = {f.name for f in dataclasses.fields(DecodeConfig)}
_OPTION_PREFIX = "options."


def _as_text(value) -> str:
    """A model-arg value back as its text: lm-eval reads "none" / "None" as None."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def gather_options(decode_kwargs: dict) -> dict:
    """Move the `options.KEY=VALUE` model args out of `decode_kwargs` into `options`.

    lm-eval hands numbers, booleans and "none" over already typed (0.9, True, None): they go back
    to text and are typed again by the strategy's options class, so a wrong key or value names
    the option.
    """
    keys = [k for k in decode_kwargs if k.startswith(_OPTION_PREFIX)]
    if not keys:
        return decode_kwargs
    if "options" in decode_kwargs:
        raise ValueError("d2f model_args: give options either as options.KEY=VALUE or options=")
    out = {k: v for k, v in decode_kwargs.items() if k not in keys}
    strategy = out.get("strategy", DecodeConfig.strategy)
    items = [f"{k[len(_OPTION_PREFIX) :]}={_as_text(decode_kwargs[k])}" for k in keys]
    try:
        out["options"] = parse_options(strategy, items)
    except ValueError as err:
        raise ValueError(f"d2f model_args: {err}") from None
    return out


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


def request_seed(seed: int, context: list[int], continuation: list[int]) -> int:
    """A 63-bit seed from (seed, context ids, continuation ids): the same request, the same draws."""
    digest = hashlib.sha256(json.dumps([seed, context, continuation]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def check_strategy(strategy: str, family: Family) -> None:
    """`ar` and `jacobi` decode autoregressive models only, every other strategy dLLMs only."""
    causal = strategy in CAUSAL_STRATEGIES
    if causal and not family.causal:
        raise ValueError(
            f"d2f: strategy {strategy!r} needs an autoregressive model, got a {family.name} dLLM"
        )
    if not causal and family.causal:
        raise ValueError(f"d2f: strategy {strategy!r} needs a dLLM; this model is autoregressive")


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
        decode_kwargs = gather_options(decode_kwargs)
        unknown = sorted(set(decode_kwargs) - _DECODE_FIELDS)
        if unknown:
            raise ValueError(f"d2f model_args: unknown {unknown}; known: {known_model_args()}")
        decode_kwargs.setdefault("truncate_prompt", True)  # as the published eval: keep the end
        self.decode = DecodeConfig(**decode_kwargs)
        self._user_decode_keys = set(decode_kwargs)
        check_attention(attn_implementation, "d2f model_args: attn_implementation")
        if str(batch_size).startswith("auto"):
            raise ValueError("d2f: batch_size=auto is not supported; give an integer")
        self.batch_size = int(batch_size)
        if adapter is not None and is_local(adapter) and not Path(adapter).is_dir():
            raise FileNotFoundError(f"d2f: adapter {missing(adapter)}")
        self.model_args = {
            "pretrained": str(pretrained),
            "adapter": adapter,
            "dtype": dtype,
            "batch_size": self.batch_size,
            **dataclasses.asdict(self.decode),
        }
        self.stats_dir = stats_dir
        if stats_dir is not None:  # a clash with an earlier run there fails now, not after it
            SpeedLog.check_same_run(self._stats_path("d2f_speed.json"), self.model_args)
        # config.json and the tokenizer only: the weights wait for the first request
        raw = read_config(pretrained)
        spec = detect_spec(raw, where=f"{pretrained}/config.json")
        self.tokenizer = load_tokenizer(pretrained, spec)
        if self.tokenizer is None:
            raise ValueError(f"{pretrained}: no tokenizer files; lm-eval needs a tokenizer")
        self.family = spec.facts(raw, self.tokenizer)
        check_strategy(self.decode.strategy, self.family)
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
        self._load_args = dict(
            name_or_path=pretrained,
            adapter=adapter,
            dtype=dtype,
            device=device,
            attn_implementation=attn_implementation,
            merge_adapter=merge_adapter,
        )
        self._model = None
        self.add_bos = self.tokenizer.bos_token_id is not None if add_bos is None else add_bos
        self.mc_samples = int(mc_samples)
        self.seed = int(seed)
        self.speed = SpeedLog()

    @property
    def model(self):
        """The weights, loaded at the first use (after lm-eval has built and checked the tasks)."""
        if self._model is None:
            self._model, _ = load_model(**self._load_args)
        return self._model

    # ---- lm-eval plumbing -------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.family.end_token_ids[0]

    @property
    def prefix_token_id(self) -> int:
        """The context of an empty-context request: BOS where prompts get one."""
        bos = self.tokenizer.bos_token_id
        return bos if self.add_bos and bos is not None else self.eot_token_id

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

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        ctx, cont = super()._encode_pair(context, continuation)
        return self._with_bos(ctx), cont

    def all_gather(self, tensor):
        if self._world_size <= 1:
            return tensor
        from accelerate.utils import gather

        return gather(tensor)

    def gather_object(self, obj, dst=0):
        """Every rank's `obj` as a list on rank `dst`, None on the others."""
        from accelerate.utils import gather_object

        gathered = gather_object([obj])  # all ranks get the list (accelerate flattens one level)
        return gathered if self._rank == dst else None

    def barrier(self) -> None:
        if self._world_size > 1:
            self._state.wait_for_everyone()

    # ---- generation ------------------------------------------------------------------------
    def _with_bos(self, ids: list[int]) -> list[int]:
        """`ids` with exactly one leading BOS (a chat-templated context already starts with it)."""
        bos = self.tokenizer.bos_token_id
        if self.add_bos and bos is not None and ids[:1] != [bos]:
            ids = [bos] + ids
        return ids

    def _prompt_ids(self, context: str) -> list[int]:
        """Context ids with exactly one BOS."""
        return self._with_bos(self.tok_encode(context))

    def _config(self, gen_kwargs: dict) -> DecodeConfig:
        changes = {}
        if "max_new_tokens" not in self._user_decode_keys:
            budget = gen_kwargs.get("max_gen_toks", self.decode.max_new_tokens)
            # None: the decoder fits the most whole blocks into the context (DecodeConfig)
            changes["max_new_tokens"] = (
                None if budget is None else max(int(budget), self.decode.block_size)
            )
        if "temperature" not in self._user_decode_keys and gen_kwargs.get("do_sample"):
            changes["temperature"] = float(gen_kwargs.get("temperature", 1.0))
        return dataclasses.replace(self.decode, **changes)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        model = self.model  # loaded outside the timed calls
        batches = Collator(
            requests,
            sort_fn=lambda req: -len(req.args[0]),  # similar lengths batch together
            group_fn=lambda req: {"task": req.task_name, **req.args[1]},
            group_by="gen_kwargs",
        )
        seen: set[tuple] = set()  # lm-eval pads ranks with copies: count each request once
        bar = tqdm(
            total=len(requests), desc=f"d2f generate (rank {self._rank})", disable=disable_tqdm
        )
        texts: list[str] = []
        for chunk in batches.get_batched(n=self.batch_size):
            texts += self._generate_batch(model, chunk, seen)
            bar.update(len(chunk))
        bar.close()
        self._write_speed()
        return batches.get_original(texts)

    def _generate_batch(self, model, chunk: list, seen: set[tuple]) -> list[str]:
        """One `generate` call over requests of one task and one set of generation settings."""
        gen_kwargs = dict(chunk[0].args[1])
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        prompts = [self._prompt_ids(req.args[0]) for req in chunk]
        t0 = time.perf_counter()
        out = generate(model, prompts, self._config(gen_kwargs))
        texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in out.tokens]
        wall = time.perf_counter() - t0
        kept, rows = [], []
        for req, ids, text, row in zip(chunk, out.tokens, texts, out.stats.rows, strict=True):
            kept.append(cut_at_stop(text, until))
            self.cache_hook.add_partial("generate_until", req.args, kept[-1])
            key = (req.task_name, req.doc_id, req.idx)
            if key not in seen:
                seen.add(key)
                rows.append(self._counted(ids, text, kept[-1], row))
        self.speed.tasks[chunk[0].task_name].add_call(wall * len(rows) / len(chunk), rows)
        return kept

    def _counted(self, ids: list[int], text: str, kept: str, row) -> tuple[int, int, int]:
        """(tokens, tokens_with_end, forwards) of one sample; a stop-string cut counts the ids
        that made it into the kept text."""
        if len(kept) < len(text):
            n = count_prefix_tokens(self.tokenizer, ids, len(kept))
            return n, n, row.forwards
        return row.tokens, row.tokens_with_end, row.forwards

    def _stats_path(self, name: str) -> Path:
        out = Path(self.stats_dir)
        return (out.parent if out.suffix == ".json" else out) / name

    def _write_speed(self) -> None:
        states = self.gather_object(self.speed.state(), dst=0)
        if self.stats_dir is None:
            return
        SpeedLog.write(
            self._stats_path(f"d2f_speed_rank{self._rank}.json"),
            SpeedLog.merged([self.speed.state()], self.model_args),
        )
        if self._rank == 0:
            SpeedLog.write(
                self._stats_path("d2f_speed.json"), SpeedLog.merged(states, self.model_args)
            )

    # ---- likelihood ------------------------------------------------------------------------
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        mask_id = self.family.mask_token_id
        if mask_id is None:
            raise ValueError("loglikelihood needs a dLLM with a mask token")
        model = self.model
        context = getattr(model.config, "max_position_embeddings", 4096)
        out = []
        for _, ctx, cont in tqdm(requests, desc="d2f loglikelihood", disable=disable_tqdm):
            ctx = ctx[-(context - len(cont)) :] if len(ctx) + len(cont) > context else ctx
            gen = torch.Generator().manual_seed(request_seed(self.seed, ctx, cont))
            out.append(self._mc_loglikelihood(model, ctx, cont, mask_id, gen))
            self.cache_hook.add_partial("loglikelihood", None, out[-1])
        return out

    def _mc_loglikelihood(
        self, model, ctx: list[int], cont: list[int], mask_id: int, gen: torch.Generator
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
        ).to(self._device)  # (n + 1, P + L): + an all-masked row
        ids = torch.where(batch, mask_id, x[None])  # (n + 1, P + L)
        valid = torch.ones_like(ids, dtype=torch.bool)
        attn = full_mask(block_ids(valid, torch.full((n + 1,), P + L, device=self._device), 1))
        dtype = next(model.parameters()).dtype
        logits = model(
            input_ids=ids,
            attention_mask=to_additive(attn, dtype),
            position_ids=torch.arange(P + L, device=self._device)[None],
        ).logits  # (n + 1, P + L, V)
        logits = self.family.align_logits(logits)  # column i predicts token i (Dream's shift)
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


def known_model_args() -> list[str]:
    """Every model arg the `d2f` model takes: its own and every `DecodeConfig` field."""
    own = inspect.signature(D2FLM.__init__).parameters
    names = {p for p, v in own.items() if p != "self" and v.kind is not v.VAR_KEYWORD}
    return sorted(names | _DECODE_FIELDS)
