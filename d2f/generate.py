"""`python -m d2f.generate`: decode one prompt, printing the text as it is decoded, then the stats.

    python -m d2f.generate --model GSAI-ML/LLaDA-8B-Instruct \\
        --adapter SJTU-Deng-Lab/D2F_LLaDA_Instruct_8B_Lora --dtype bfloat16 --device cuda \\
        --prompt "What is 12 + 30?" --block_size 32 --max_new_tokens 256

Every `DecodeConfig` field is an option of the same name, with its default; the default strategy is
d2f for a dLLM and ar for an autoregressive model.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Sequence

import torch

from d2f.decoding import DecodeConfig, StepEvent, generate
from d2f.decoding.config import field_help, parse_options
from d2f.family import family_of
from d2f.models import load_model

PICTURE_SUFFIXES = (".png", ".html")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every optional option's default in its help line."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.required else super()._get_help_string(action)


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per `DecodeConfig` field: its type, its default, its one-line comment."""
    hints = typing.get_type_hints(DecodeConfig)
    helps = field_help()
    group = parser.add_argument_group("decoding (DecodeConfig fields)")
    for f in dataclasses.fields(DecodeConfig):
        hint, name = hints[f.name], f"--{f.name}"
        args = typing.get_args(hint)
        text = helps.get(f.name, "")
        if f.name == "options":  # KEY=VALUE pairs, typed by the strategy's options class
            group.add_argument(
                name, nargs="*", default=[], metavar="KEY=VALUE", help=f"{text} (KEY=VALUE ...)"
            )
        elif f.name == "strategy":  # None here: chosen from the model once it is loaded
            group.add_argument(
                name,
                choices=args,
                default=None,
                help=f"{text}; None = d2f (ar for an autoregressive model)",
            )
        elif hint is bool or bool in args:
            group.add_argument(
                name, action=argparse.BooleanOptionalAction, default=f.default, help=text
            )
        elif typing.get_origin(hint) is typing.Literal:
            group.add_argument(name, choices=args, default=f.default, help=text)
        else:
            kind = next((a for a in (*args, hint) if a in (int, float, str)), str)
            group.add_argument(name, type=kind, default=f.default, help=text)


def check_device(device: str | None) -> None:
    """ValueError naming `--device` when it is not a device of this machine (before any load)."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"--device {device!r} is not a torch device: {err}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {device}: CUDA is not available here (torch {torch.__version__}, "
                "no CUDA device found); use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available here; use --device cpu")


class StreamPrinter:
    """Prints row 0's answer as it grows: the decoded prefix, up to its first end token.

    Tokens after the first still-masked position wait; nothing after the first end token is ever
    shown (the final text stops there too), whatever the strategy decodes later.
    """

    def __init__(self, tokenizer, mask_id: int | None, end_ids: Sequence[int] = (), out=None):
        self.tokenizer, self.mask_id, self.end_ids = tokenizer, mask_id, set(end_ids)
        self.out = sys.stdout if out is None else out
        self.shown = ""

    def __call__(self, event: StepEvent) -> None:
        where = (event.rows == 0).nonzero()
        if len(where) == 0:
            return
        answer = event.answer[int(where[0, 0])].tolist()
        stop = next(
            (i for i, t in enumerate(answer) if t == self.mask_id or t in self.end_ids),
            len(answer),
        )
        text = self.tokenizer.decode(answer[:stop], skip_special_tokens=True)
        if text.startswith(self.shown):
            self.out.write(text[len(self.shown) :])
            self.out.flush()
            self.shown = text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m d2f.generate", description=__doc__, formatter_class=_HelpFormatter
    )
    parser.add_argument("--model", required=True, help="hub id or local checkpoint directory")
    parser.add_argument("--adapter", default=None, help="LoRA adapter: hub id or directory")
    parser.add_argument(
        "--merge_adapter",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fold the LoRA adapter into the weights for decoding (same tokens; an unmerged "
        "adapter costs peft's per-layer overhead on every call, docs/decoding.md)",
    )
    parser.add_argument("--prompt", required=True, help="the prompt text")
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16 (None: the checkpoint's)")
    parser.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (None: cpu)")
    parser.add_argument(
        "--picture", default=None, help="save the decode picture to this .png or .html file"
    )
    _add_config_options(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    fields = {f.name for f in dataclasses.fields(DecodeConfig)}
    chosen = {k: v for k, v in vars(args).items() if k in fields}
    if args.picture is not None and not args.picture.endswith(PICTURE_SUFFIXES):
        parser.error(f"--picture {args.picture}: the file name must end in .png or .html")
    try:  # every check before the (expensive) load
        strategy = args.strategy or "d2f"
        chosen["options"] = parse_options(strategy, chosen.get("options") or [])
        cfg = DecodeConfig(**{**chosen, "strategy": strategy})
        check_device(args.device)
        model, tok = load_model(
            args.model,
            adapter=args.adapter,
            dtype=args.dtype,
            device=args.device,
            merge_adapter=args.merge_adapter,
        )
    except (ValueError, TypeError, OSError) as err:
        parser.error(str(err))
    if tok is None:
        parser.error(f"{args.model} has no tokenizer files: cannot decode text prompts")
    family = family_of(model)
    if args.strategy is None and family.causal:
        cfg = dataclasses.replace(cfg, strategy="ar")
    printer = StreamPrinter(tok, family.mask_token_id, family.end_token_ids)
    try:
        out = generate(
            model, [args.prompt], cfg, tokenizer=tok, on_step=printer, record=bool(args.picture)
        )
    except ValueError as err:  # a prompt that does not fit, a strategy the model cannot run
        parser.error(str(err))
    if printer.shown != out.texts[0]:  # what streaming could not show in order
        print(f"\n{out.texts[0]}")
    print(f"\n\n[{cfg.strategy}] {out.stats.summary()}")
    if args.adapter is not None:  # what the loaded model is, not what was asked
        from peft import PeftModel

        unmerged = isinstance(model, PeftModel)
        how = "unmerged (--no-merge_adapter)" if unmerged else "merged into the weights"
        print(f"[adapter] {args.adapter}: {how}")
    if args.picture:
        from d2f.render import render_html, render_png

        render = render_html if args.picture.endswith(".html") else render_png
        print(f"decode picture: {render(out.trace, args.picture)}")


if __name__ == "__main__":
    main()
