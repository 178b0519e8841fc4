"""Decoding benchmark: every strategy side by side, in one run, at several batch sizes.

The default list is every strategy in `d2f.decoding.DECODERS`. On the default random model, `ar`
runs on a random causal model of the same size (the dLLM cannot run it); with `--model`, a
strategy the checkpoint's family cannot run is listed as n/a.

Prints, per strategy and batch size: forwards per sequence, tokens per forward (TPF), wall time
per generated token, tokens per second, and the share of wall time spent OUTSIDE model forwards
(the decoder's own overhead). Speed is meant to be read as ratios within one run. Every batch
size decodes the same prompts (`--n`, default the largest batch size; in chunks of the batch
size), and the batch sizes and engine variants alternate inside each repeat: `x b1` is the
first batch size's time over this one's (the median over repeats: the throughput gain of
batching) and `same` says whether the tokens equal the first batch size's.

    python scripts/bench_decode.py                       # tiny random LLaDA, CPU
    python scripts/bench_decode.py --model DIR --adapter DIR --strategies d2f vanilla
    python scripts/bench_decode.py --hidden 2048 --layers 16 --device cuda --dtype bfloat16
    python scripts/bench_decode.py --hidden 4096 --layers 32 --device cuda --dtype bfloat16 \
        --strategies ar d2f --kv_cache dynamic static --compile off default reduce-overhead \
        --batch_sizes 1 8 32      # 8B-shaped (scripts/gpu_bench.sh runs this)
    python scripts/bench_decode.py --strategies d2f --kv_cache dynamic static \
        --compile off default        # the engines side by side, alternated run by run
    python scripts/bench_decode.py --model d2f/tinyworld/assets/chain/teacher --adapter DIR \
        --world chain --block_size 8 --max_new_tokens 48 --tau_add 0.1 --tau_act 0.95 \
        --tau_conf 0.9 --batch_sizes 1 16 --n 64 --strategies d2f   # held-out questions

`--kv_cache` and `--compile` list engine variants (`DecodeConfig.kv_cache`, `.compile`); each
strategy runs every variant it supports, alternated within each repeat, and the table gives each
variant's median time against the first one's in the same repeats (`x first`). The first call of a
variant (its warm-up, over the whole batch) is reported as `first s` (compile time when compiled),
and `graphs` counts the graphs dynamo built during it and (after the slash) during the timed runs.

`ms/fwd` is the wall time per model call (the batch's calls; a batched call counts once) and
`x floor` that time over the weight-bandwidth floor: the bytes of the model's weights over the
device's memory bandwidth (`--bandwidth_gbs`; on CUDA read from the device's memory clock and bus
width when torch reports them), the least one call can take when it reads every weight once.
A call near 1x floor is memory-bound as it should be at small batch; far above it, time goes to
overhead (launches, masks, Python). `--hidden 4096 --layers 32` is LLaDA-8B's width, depth, heads
and MLP (12288) with the tiny tokenizer's vocabulary: about 7.0B of its 8.0B weights.

A random checkpoint is near-uniform, so nothing would pass tau_conf; `--sharpen` scales its
output layer to give confident, varied predictions (the default 12 for random checkpoints), so the
pipeline really runs several blocks and commits several tokens per step.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from d2f.decoding import DECODERS, DecodeConfig, generate
from d2f.decoding.api import CAUSAL_STRATEGIES
from d2f.decoding.config import COMPILE_MODES, KV_CACHES, STATIC_STRATEGIES
from d2f.family import family_of
from d2f.models import load_model


class ForwardTimer:
    """Wall time spent inside model forwards (pre/post hooks; CUDA-synchronised)."""

    def __init__(self, model):
        self.total = 0.0
        self._t = 0.0
        model.register_forward_pre_hook(self._pre)
        model.register_forward_hook(self._post)

    def _sync(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def _pre(self, *args):
        if torch.compiler.is_compiling():  # inside a compiled step: not timed (shown as n/a)
            return
        self._sync()
        self._t = time.perf_counter()

    def _post(self, *args):
        if torch.compiler.is_compiling():
            return
        self._sync()
        self.total += time.perf_counter() - self._t


def bandwidth_gbs(args, device: torch.device) -> float | None:
    """The memory bandwidth (GB/s) for the floor: `--bandwidth_gbs`, else, on CUDA, twice the
    memory clock times the bus width (DDR), when torch reports both; else None (no floor)."""
    if args.bandwidth_gbs:
        return args.bandwidth_gbs
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def build(args, family: str = "llada"):
    """The benchmarked model: `--model`, or a random `family` checkpoint ("llada" or "ar")."""
    if args.model:
        return load_model(
            args.model,
            adapter=args.adapter,
            dtype=args.dtype,
            device=args.device,
            merge_adapter=args.merge_adapter,
        )
    from d2f.tiny import write_tiny_checkpoint

    sizes = {}
    if args.hidden:
        heads = max(args.hidden // 128, 4)
        sizes = {
            "d_model": args.hidden,
            "n_layers": args.layers,
            "n_heads": heads,
            "mlp_hidden_size": args.hidden * 3,
            "max_sequence_length": 4096,
        }
        if family == "ar":  # the same sizes under Llama's config names
            sizes = {
                "hidden_size": args.hidden,
                "num_hidden_layers": args.layers,
                "num_attention_heads": heads,
                "intermediate_size": args.hidden * 3,
                "max_position_embeddings": 4096,
            }
    path = write_tiny_checkpoint(tempfile.mkdtemp(prefix="bench_"), family, **sizes)
    model, tok = load_model(path, dtype=args.dtype, device=args.device)
    with torch.no_grad():
        model.lm_head.weight.mul_(args.sharpen)
    return model, tok


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=None, help="checkpoint (default: a tiny random LLaDA)")
    p.add_argument("--adapter", default=None)
    p.add_argument(
        "--merge_adapter",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fold the adapter into the weights (default; scripts/bench_lora.py compares both)",
    )
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--hidden", type=int, default=0, help="random model width (default tiny)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--sharpen", type=float, default=12.0)
    p.add_argument("--strategies", nargs="+", default=list(DECODERS), choices=list(DECODERS))
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--prompt_len", type=int, default=24)
    p.add_argument(
        "--world",
        default=None,
        choices=["add2", "chain"],
        help="prompts: the miniature world's held-out questions (default: random ids)",
    )
    p.add_argument("--n", type=int, default=0, help="prompts (default: the largest batch size)")
    p.add_argument("--block_size", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--tau_add", type=float, default=0.25)
    p.add_argument("--tau_act", type=float, default=0.75)
    p.add_argument("--tau_conf", type=float, default=0.6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kv_cache", nargs="+", default=["dynamic"], choices=list(KV_CACHES))
    p.add_argument("--compile", nargs="+", default=["off"], choices=list(COMPILE_MODES))
    p.add_argument(
        "--bandwidth_gbs",
        type=float,
        default=None,
        help="device memory bandwidth for the x floor column (default: CUDA's own; CPU: none)",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = build(args)
    models = {family_of(model).causal: (model, ForwardTimer(model))}  # by causal-or-not
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    print(
        f"model: {family_of(model).name}, {sum(q.numel() for q in model.parameters()):,} parameters, "
        f"{next(model.parameters()).dtype}, {next(model.parameters()).device}, threads {args.threads}"
    )
    bw = bandwidth_gbs(args, next(model.parameters()).device)
    print(
        f"floor: {weight_bytes(model) / 1e6:.1f} MB of weights over "
        + (
            f"{bw:.0f} GB/s = {1e3 * weight_bytes(model) / (bw * 1e9):.3f} ms per call"
            if bw
            else "n/a"
        )
    )
    print(
        f"block {args.block_size}, max_new_tokens {args.max_new_tokens}, tau_add {args.tau_add}, "
        f"tau_act {args.tau_act}, tau_conf {args.tau_conf}, "
        + (
            f"{args.n or max(args.batch_sizes)} held-out {args.world} questions"
            if args.world
            else f"{args.n or max(args.batch_sizes)} random prompts of {args.prompt_len} tokens"
        )
    )
    header = (
        f"{'strategy':<13}{'engine':<20}{'batch':>6}{'fwd/seq':>9}{'TPF':>7}{'ms/token':>10}"
        f"{'tok/s':>9}{'outside fwd':>13}{'x first':>9}{'first s':>9}{'graphs':>8}"
        f"{'ms/fwd':>9}{'x floor':>9}{'x b1':>7}{'same':>6}"
    )
    print(header)
    print("-" * len(header))
    prompts = bench_prompts(args, tok, vocab, g)
    for strategy in args.strategies:
        causal = strategy in CAUSAL_STRATEGIES  # the strategies for autoregressive models
        if causal not in models and not args.model:
            other, _ = build(args, "ar" if causal else "llada")
            models[causal] = (other, ForwardTimer(other))
        if causal not in models:
            kind = "an autoregressive" if causal else "a dLLM"
            print(f"{strategy:<13}{'':<20}{'':>6}   n/a: needs {kind} model")
            continue
        model, timer = models[causal]
        bench_strategy(args, strategy, model, timer, prompts)


def bench_prompts(args, tok, vocab: int, g: torch.Generator) -> list[list[int]]:
    """The prompts every batch size decodes (`--n`, default the largest batch): the world's
    held-out questions under the chat template (`--world`), else random ids."""
    n = args.n or max(args.batch_sizes)
    if args.world:
        from d2f.tinyworld.race import prompt_ids
        from d2f.tinyworld.task import problems

        return [prompt_ids(tok, p.question) for p in problems(args.world, "test", n)]
    return [
        torch.randint(10, vocab - 10, (args.prompt_len - (i % 5),), generator=g).tolist()
        for i in range(n)
    ]


def engines(args, strategy: str) -> list[tuple[str, str]]:
    """The (kv_cache, compile) variants of `args` that `strategy` supports."""
    out = []
    for kv in args.kv_cache:
        for comp in args.compile:
            if kv == "static" and strategy not in STATIC_STRATEGIES:
                continue
            if comp != "off" and (kv != "static" or strategy not in ("d2f", "cache_only")):
                continue
            out.append((kv, comp))
    return out or [("dynamic", "off")]


def decode_all(model, prompts, cfg, bsz: int):
    """Every prompt decoded, `bsz` at a time -> (token lists, model calls, `RowStats` list)."""
    tokens, forwards, rows = [], 0, []
    for i in range(0, len(prompts), bsz):
        out = generate(model, prompts[i : i + bsz], cfg)
        tokens += out.tokens
        forwards += out.stats.forwards  # a batched call counts once
        rows += out.stats.rows
    return tokens, forwards, rows


def bench_strategy(args, strategy, model, timer, prompts) -> None:
    """Every (engine variant, batch size) of one strategy over the same prompts, alternated
    repeat by repeat; a row's time is its best repeat, its ratios are medians over repeats."""
    from torch._dynamo.utils import counters

    variants = engines(args, strategy)
    runs = [(v, b) for b in args.batch_sizes for v in variants]
    cfgs, first_s, graphs = {}, {}, {}
    for kv, comp in variants:
        cfgs[kv, comp] = DecodeConfig(
            strategy=strategy,
            block_size=args.block_size,
            max_new_tokens=args.max_new_tokens,
            tau_add=args.tau_add,
            tau_act=args.tau_act,
            tau_conf=args.tau_conf,
            # v2's own threshold (authors' 0.9) set to tau_conf so the rows compare
            options={"threshold": args.tau_conf} if strategy == "fast_dllm_v2" else None,
            kv_cache=kv,
            compile=comp,
        )
    for v, b in runs:  # warm-up: every shape of the timed runs (compile time when compiled)
        before = counters["stats"]["unique_graphs"]
        t0 = time.perf_counter()
        decode_all(model, prompts, cfgs[v], b)
        first_s[v, b] = time.perf_counter() - t0
        graphs[v, b] = [counters["stats"]["unique_graphs"] - before, 0]
    walls = {r: [] for r in runs}
    best = {}
    for _ in range(args.repeats):
        for r in runs:
            before = counters["stats"]["unique_graphs"]
            timer.total = 0.0
            t0 = time.perf_counter()
            out = decode_all(model, prompts, cfgs[r[0]], r[1])
            wall = time.perf_counter() - t0
            graphs[r][1] += counters["stats"]["unique_graphs"] - before
            walls[r].append(wall)
            if r not in best or wall < best[r][0]:
                best[r] = (wall, timer.total, out)
    bw = bandwidth_gbs(args, next(model.parameters()).device)
    b1 = args.batch_sizes[0]

    def median_ratio(num, den):
        return statistics.median(x / y for x, y in zip(walls[num], walls[den], strict=True))

    for v, b in runs:
        wall, in_fwd, (tokens, forwards, rows) = best[v, b]
        if tokens != best[variants[0], b][2][0]:
            print(f"  NOTE: {v} tokens differ from {variants[0]} at batch {b}")
        n_tok = sum(r.tokens for r in rows)
        row_fwd = sum(r.forwards for r in rows)
        ratio = median_ratio((variants[0], b), (v, b))  # the first variant's time over this one's
        speedup = median_ratio((v, b1), (v, b))  # batch b1's time over this batch's
        same = "yes" if tokens == best[v, b1][2][0] else "NO"
        engine = v[0] if v[1] == "off" else f"{v[0]}+{v[1]}"
        outside = "n/a" if v[1] != "off" else f"{100 * (1 - in_fwd / wall):.0f}%"
        ms_fwd = 1e3 * wall / max(forwards, 1)
        floor = f"{ms_fwd / (1e3 * weight_bytes(model) / (bw * 1e9)):.2f}" if bw else "n/a"
        print(
            f"{strategy:<13}{engine:<20}{b:>6}{row_fwd / len(rows):>9.1f}"
            f"{sum(r.tokens_with_end for r in rows) / max(row_fwd, 1):>7.2f}"
            f"{1e3 * wall / max(n_tok, 1):>10.2f}{n_tok / wall:>9.0f}"
            f"{outside:>13}{ratio:>9.2f}{first_s[v, b]:>9.1f}"
            f"{graphs[v, b][0]:>5}/{graphs[v, b][1]:<2}{ms_fwd:>9.2f}{floor:>9}"
            f"{speedup:>7.2f}{same:>6}"
        )


if __name__ == "__main__":
    main()
