"""`python -m d2f.demo`: serve the demo page on the loopback address (docs/demo.md).

    python -m d2f.demo                      # the miniature world: shipped teacher (+ the
                                            # quickstart's student when cached) against its AR model
    python -m d2f.demo --model GSAI-ML/LLaDA-8B-Instruct \\
        --adapter SJTU-Deng-Lab/D2F_LLaDA_Instruct_8B_Lora --ar-model meta-llama/Llama-3.1-8B-Instruct \\
        --dtype bfloat16 --device cuda

Needs the `demo` extra: pip install -e ".[demo]".
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    from d2f.tinyworld.quickstart import DEFAULT_WORLD
    from d2f.tinyworld.world import WORLDS

    p = argparse.ArgumentParser(
        prog="python -m d2f.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--world",
        choices=sorted(WORLDS),
        default=DEFAULT_WORLD,
        help="the miniature world whose shipped models and held-out problems are the default "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="the dLLM: hub id or directory (default: the world's shipped teacher)",
    )
    p.add_argument(
        "--adapter",
        default=None,
        help="its D2F LoRA adapter: hub id, directory or "
        "'none' (default: the quickstart's cached student for the shipped teacher)",
    )
    p.add_argument(
        "--ar-model",
        "--ar_model",
        dest="ar_model",
        default=None,
        help="the autoregressive model (default: the world's shipped AR model; "
        "required with --model)",
    )
    p.add_argument(
        "--quickstart_out",
        type=Path,
        default=None,
        help="the quickstart's --out, where its student is looked for (default: its own)",
    )
    p.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="e.g. cuda, cpu (default: cpu)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to serve on (default: the loopback address %(default)s)",
    )
    p.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    p.add_argument(
        "--concurrency",
        type=int,
        default=4,
        help="generations (browser tabs) decoding at once (default: %(default)s)",
    )
    p.add_argument(
        "--problems",
        type=int,
        default=20,
        help="held-out problems offered on the page (default: %(default)s)",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    p = _parser()
    args = p.parse_args(argv)
    if args.concurrency < 1:
        p.error(f"--concurrency must be >= 1, got {args.concurrency}")
    if not 0 < args.port < 65536:
        p.error(f"--port must be in 1..65535, got {args.port}")
    try:
        import gradio  # noqa: F401
    except ImportError:
        p.error(
            'the demo needs Gradio: pip install -e ".[demo]" (or bash scripts/install_demo_deps.sh)'
        )
    from d2f.demo import app, engine
    from d2f.generate import check_device

    try:
        check_device(args.device)
        models = engine.resolve_models(
            args.world, args.model, args.adapter, args.ar_model, args.quickstart_out
        )
        sides = engine.load_sides(models, dtype=args.dtype, device=args.device)
    except (ValueError, OSError) as err:
        p.error(str(err))
    problems = engine.held_out_problems(args.world, args.problems) if args.model is None else []
    title = (
        f"**{models.label}**: `{models.model}`"
        + (f" + adapter `{models.adapter}`" if models.adapter else "")
        + f"  \n**autoregressive**: `{models.ar_model}`"
    )
    print(f"d2f demo: {models.label} vs autoregressive on http://{args.host}:{args.port}")
    app.launch(app.build(sides, title, problems), args.host, args.port, args.concurrency)


if __name__ == "__main__":
    main()
