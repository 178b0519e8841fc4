"""`python -m d2f.generate`: decode one prompt, printing the text as it is decoded, then the stats.

    python -m d2f.generate --model GSAI-ML/LLaDA-8B-Instruct \\
        --adapter SJTU-Deng-Lab/D2F_LLaDA_Instruct_8B_Lora --dtype bfloat16 --device cuda \\
        --prompt "What is 12 + 30?" --block_size 32 --max_new_tokens 256

Every `DecodeConfig` field is an option of the same name.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from d2f.decoding import DecodeConfig, StepEvent, generate
from d2f.family import family_of
from d2f.models import load_model


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(DecodeConfig)
    for f in dataclasses.fields(DecodeConfig):
        hint = hints[f.name]
        args = typing.get_args(hint)
        if hint is bool or (bool in args):
            parser.add_argument(f"--{f.name}", type=_bool, default=f.default)
        elif typing.get_origin(hint) is typing.Literal:
            parser.add_argument(f"--{f.name}", choices=args, default=f.default)
        else:
            kind = next((a for a in (*args, hint) if a in (int, float, str)), str)
            parser.add_argument(f"--{f.name}", type=kind, default=f.default)


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


class StreamPrinter:
    """Prints the decoded prefix of row 0 as it grows (tokens after the first mask wait)."""

    def __init__(self, tokenizer, mask_id, out=sys.stdout):
        self.tokenizer, self.mask_id, self.out = tokenizer, mask_id, out
        self.shown = ""

    def __call__(self, event: StepEvent) -> None:
        where = (event.rows == 0).nonzero()
        if len(where) == 0:
            return
        answer = event.answer[int(where[0, 0])].tolist()
        if self.mask_id is not None and self.mask_id in answer:
            answer = answer[: answer.index(self.mask_id)]
        text = self.tokenizer.decode(answer, skip_special_tokens=True)
        if text.startswith(self.shown):
            self.out.write(text[len(self.shown) :])
            self.out.flush()
            self.shown = text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m d2f.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="hub id or local checkpoint directory")
    parser.add_argument("--adapter", default=None, help="LoRA adapter: hub id or directory")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: the checkpoint's)")
    parser.add_argument("--device", default=None, help="e.g. cuda, cpu")
    parser.add_argument("--picture", default=None, help="save the decode picture (.png or .html)")
    _add_config_options(parser)
    args = parser.parse_args(argv)
    fields = {f.name for f in dataclasses.fields(DecodeConfig)}
    try:
        cfg = DecodeConfig(**{k: v for k, v in vars(args).items() if k in fields})
        model, tok = load_model(
            args.model, adapter=args.adapter, dtype=args.dtype, device=args.device
        )
    except (ValueError, OSError) as err:
        parser.error(str(err))
    if tok is None:
        parser.error(f"{args.model} has no tokenizer files: cannot decode text prompts")
    printer = StreamPrinter(tok, family_of(model).mask_token_id)
    out = generate(
        model, [args.prompt], cfg, tokenizer=tok, on_step=printer, record=args.picture is not None
    )
    if printer.shown != out.texts[0]:  # what streaming could not show in order
        print(f"\n{out.texts[0]}")
    print(f"\n\n[{cfg.strategy}] {out.stats.summary()}")
    if args.picture:
        from d2f.render import render_html, render_png

        render = render_html if args.picture.endswith(".html") else render_png
        print(f"decode picture: {render(out.trace, args.picture)}")


if __name__ == "__main__":
    main()
