"""Benchmark one D2F distillation step: real tokens/s, and the share spent on noise and masks.

The step timed is the trainer's own `d2f.train.train_step` (`make_batch`: block noise from
d2f.schedule, block ids, positions -> teacher pass (adapter off, bidirectional) -> student pass
(block-causal) -> distillation loss -> backward -> non-finite check -> clip -> AdamW), on a `Run`
built in memory instead of by `d2f.train.setup`. Noise and masks are also timed alone on the same
batch, so their share of the step is measured, not guessed. The model is a random LLaDA-format model
built in memory (`d2f.models.build_model`) with a LoRA adapter on the attention projections.
tokens/s counts real tokens (prompt + answer + end, no padding), as `metrics.jsonl` does.

    python scripts/bench_train_step.py                                   # tiny preset shapes, CPU
    python scripts/bench_train_step.py --length 1024 --batch 1 --block 16  # released shapes, tiny model
    python scripts/bench_train_step.py --device cuda --bf16 --d-model 4096 --heads 32 --mlp 12288 \\
        --layers 4 --vocab 126464 --length 1024 --batch 1 --block 16 --lora-r 32  # GPU, real width
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, reps: int, device: torch.device) -> float:
    """Median wall time of fn() in milliseconds."""
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(1000.0 * (time.perf_counter() - t0))
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", type=int, default=8, help="sequences per step (tiny preset: 8)")
    p.add_argument("--length", type=int, default=48, help="tokens per sequence (tiny preset: 48)")
    p.add_argument("--prompt", type=float, default=0.55, help="prompt share of the sequence")
    p.add_argument("--block", type=int, default=4, help="block size (tiny preset: 4)")
    p.add_argument("--d-model", type=int, default=48)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mlp", type=int, default=96)
    p.add_argument("--vocab", type=int, default=0, help="embedding rows; 0 = the tiny tokenizer's")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--attn", default="eager", choices=["eager", "sdpa"])
    p.add_argument("--bf16", action="store_true", help="bf16 weights of the base + bf16 autocast")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()

    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model

    from d2f.checkpoint import TrainerState
    from d2f.config import NoiseConfig, RunConfig, TrainConfig
    from d2f.data import EpochSampler, TokenBatch
    from d2f.family import family_of
    from d2f.mask import block_causal_mask, full_mask, to_additive
    from d2f.models import build_model
    from d2f.objectives import OBJECTIVES, make_batch
    from d2f.tiny import llada_config, llada_tokenizer
    from d2f.train import Run, optimizer_and_schedule, train_step

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tok = llada_tokenizer()
    vocab = args.vocab or len(tok) + 3
    raw = llada_config(vocab, tok.mask_token_id, tok.eos_token_id, tok.bos_token_id,
                       d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                       mlp_hidden_size=args.mlp, max_sequence_length=max(512, args.length))  # fmt: skip
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    base = build_model(raw, tokenizer=tok, seed=0, dtype=dtype)
    base.set_attn_implementation(args.attn)
    fam = family_of(base)
    model = get_peft_model(base, LoraConfig(r=args.lora_r, lora_alpha=args.lora_r,
                                            target_modules=list(fam.lora_target_modules)))  # fmt: skip
    model.train()
    B, L = args.batch, args.length
    tc = TrainConfig(micro_batch_size=B, mixed_precision="bf16" if args.bf16 else "no")
    accelerator = Accelerator(cpu=device.type == "cpu")
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer, scheduler = optimizer_and_schedule(params, tc)
    model, optimizer = accelerator.prepare(model, optimizer)
    objective = OBJECTIVES["distill"]
    run = Run(
        cfg=RunConfig(train=tc),
        accelerator=accelerator,
        objective=objective,
        family=fam,
        model=model,
        params=params,
        optimizer=optimizer,
        scheduler=scheduler,
        state=TrainerState(EpochSampler(1, tc.seed), tc.seed),
        noise=objective.noise_config(NoiseConfig(block_size=args.block)),
        mask_dtype=dtype,
    )

    gen = torch.Generator().manual_seed(0)
    prompt = torch.full((B,), int(args.prompt * L), dtype=torch.long)
    tokens = TokenBatch(torch.randint(20, len(tok) - 1, (B, L), generator=gen), prompt,
                        torch.full((B,), L - L // 8, dtype=torch.long))  # fmt: skip
    real = int(tokens.lengths.sum())

    def step():
        train_step(run, tokens)

    def noise_only():
        make_batch(tokens, fam, run.noise, gen)

    blocks = make_batch(tokens, fam, run.noise, gen).blocks.to(device)

    def masks_only():  # the student's and the teacher's additive masks
        to_additive(block_causal_mask(blocks), dtype)
        to_additive(full_mask(blocks), dtype)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_step = _time(step, args.steps, device)
    t_noise = _time(noise_only, args.steps, device)
    t_masks = _time(masks_only, args.steps, device)
    n_params = sum(q.numel() for q in model.parameters())
    print(f"model: LLaDA-format, d_model {args.d_model}, {args.layers} layers, vocab {vocab}, "
          f"{n_params / 1e6:.2f}M parameters, LoRA r{args.lora_r}, {args.attn}, "
          f"{'bf16' if args.bf16 else 'fp32'}, {device}, {torch.get_num_threads()} thread(s)")  # fmt: skip
    print(f"batch {B} x {L} positions ({real} real tokens), blocks of {args.block}, "
          f"median of {args.steps} steps")  # fmt: skip
    print(
        f"step:  {t_step:8.2f} ms   {real / t_step * 1000:10.0f} real tokens/s (d2f.train.train_step)"
    )
    print(
        f"noise: {t_noise:8.3f} ms   {100 * t_noise / t_step:5.2f}% of the step (add_noise, block ids, positions)"
    )
    print(
        f"masks: {t_masks:8.3f} ms   {100 * t_masks / t_step:5.2f}% of the step (block-causal + full, additive)"
    )
    if device.type == "cuda":
        print(f"peak memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
