"""The demo's generation logic, without any UI: which models, which settings, and a stream of what
both models have decoded so far.

`race_stream` runs the D2F side and the AR side at once (one thread each, both through
`d2f.generate` with an `on_step` callback) and yields a `Snapshot` of each side whenever either
has made a step. A side's live counters come from the decode itself: tokens = decoded positions
before the first decoded end token, forwards = calls of the model made by this decode's thread
(a forward hook), seconds = wall time since the call started. When a side finishes, its counters
are replaced by the call's `DecodeStats` (the numbers `generate` reports), and its text by the
call's own.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from d2f.decoding import DecodeConfig, DecodeOutput, StepEvent, generate
from d2f.family import family_of

# Strategies the D2F side offers: the dLLM decoders whose settings are the shared DecodeConfig
# fields (strategies with options of their own run with those options' defaults).
DLLM_STRATEGIES = (
    "d2f",
    "cache_only",
    "vanilla",
    "fast_dllm",
    "fast_dllm_v2",
    "d3llm",
    "dinfer",
    "freedave",
    "sched",
    "prophet",
)
PAPER = DecodeConfig()  # the controls' defaults: the paper's (block 32, tau 0.1 / 0.95 / 0.9)


@dataclass
class Side:
    """One model of the race: its label on the page, the loaded model and its tokenizer."""

    label: str  # e.g. "D2F student", "teacher under D2F (undistilled)", "autoregressive"
    model: object
    tokenizer: object

    @property
    def causal(self) -> bool:
        return family_of(self.model).causal


@dataclass
class Counters:
    """A side's counters; `final` once they are the call's DecodeStats."""

    tokens: int = 0  # decoded tokens before the first end token
    tokens_with_end: int = 0  # ... and the end token once decoded: the TPF numerator
    forwards: int = 0  # model calls (prefill included)
    seconds: float = 0.0  # wall time of the call so far
    final: bool = False

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens_with_end / max(self.forwards, 1)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


@dataclass
class Snapshot:
    """What one side looks like now."""

    label: str
    text: str = ""  # the answer so far: its decoded prefix (the final text once done)
    tokens: list[int] = field(default_factory=list)  # decoded prefix ids (final ids once done)
    counters: Counters = field(default_factory=Counters)
    trace: list[StepEvent] = field(default_factory=list)  # every step so far (the picture)
    status: str = "waiting"  # waiting | running | done | stopped | error
    error: str | None = None  # the message when status == "error"
    output: DecodeOutput | None = None  # the call's result once done


class Stopped(Exception):
    """Raised inside the decode (from the step callback) when the user pressed Stop."""


def settings(
    block_size,
    tau_add,
    tau_act,
    tau_conf,
    strategy: str = "d2f",
    max_new_tokens=None,
) -> tuple[DecodeConfig, DecodeConfig]:
    """The two sides' configs from the page's controls; ValueError with a readable message for a
    bad value (the page shows it). The AR side decodes greedily with the same answer budget."""
    if strategy not in DLLM_STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(DLLM_STRATEGIES)}, got {strategy!r}")
    values = {"block_size": block_size, "max_new_tokens": max_new_tokens}
    for name, value in values.items():  # UI numbers arrive as floats: whole numbers only
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"{name} must be a whole number, got {value}")
            values[name] = int(value)
    if values["max_new_tokens"] == 0:
        values["max_new_tokens"] = None  # 0 on the page = the most that fits
    try:
        d2f_cfg = DecodeConfig(
            strategy=strategy,
            tau_add=tau_add,
            tau_act=tau_act,
            tau_conf=tau_conf,
            **values,
        )
    except TypeError as err:  # a missing or non-numeric control
        raise ValueError(str(err)) from None
    ar_cfg = DecodeConfig(strategy="ar", **values)
    return d2f_cfg, ar_cfg


def prompt_ids(tokenizer, text: str) -> list[int]:
    """The prompt's ids: under the chat template with one BOS when the tokenizer has a template (as
    the miniature world's models were trained and scored, `d2f.tinyworld.race.prompt_ids`),
    else the plain encoding."""
    if not text or not text.strip():
        raise ValueError("the prompt is empty")
    if tokenizer.chat_template:
        from d2f.tinyworld.race import prompt_ids as chat_ids

        return chat_ids(tokenizer, text)
    return tokenizer(text)["input_ids"]


def _decoded_prefix(decoded: list[bool], answer: list[int], ends: set[int]) -> tuple[int, int]:
    """(tokens, tokens_with_end) of a partly decoded answer: the decoded positions before the first
    decoded end token, and that count plus one when an end token has been decoded."""
    cut = next(
        (i for i, (d, t) in enumerate(zip(decoded, answer, strict=True)) if d and t in ends), None
    )
    head = decoded if cut is None else decoded[:cut]
    n = sum(head)
    return n, n + (cut is not None)


def _text_prefix(decoded: list[bool], answer: list[int], ends: set[int]) -> list[int]:
    """The answer's leading run of decoded tokens, up to the first end token (what reads as text)."""
    out = []
    for d, t in zip(decoded, answer, strict=True):
        if not d or t in ends:
            break
        out.append(t)
    return out


def side_stream(side: Side, ids: list[int], cfg: DecodeConfig, stop: threading.Event, emit) -> None:
    """Decode `ids` with `side` (blocking), calling `emit(snapshot)` after every step and once at
    the end (status done, stopped or error). Meant to run in its own thread."""
    family = family_of(side.model)
    ends = set(family.end_token_ids)
    snap = Snapshot(side.label, status="running")
    decoded: list[bool] | None = None
    me = threading.get_ident()
    t0 = time.perf_counter()

    def count(module, args, output) -> None:
        if threading.get_ident() == me:  # another tab may be running the same model
            snap.counters.forwards += 1

    def on_step(event: StepEvent) -> None:
        nonlocal decoded
        if stop.is_set():
            raise Stopped
        if not bool((event.rows == 0).any()):
            return
        answer = event.answer[0].tolist()
        now = event.committed[0].tolist()
        decoded = now if decoded is None else [a or b for a, b in zip(decoded, now, strict=True)]
        c = snap.counters
        c.tokens, c.tokens_with_end = _decoded_prefix(decoded, answer, ends)
        c.seconds = time.perf_counter() - t0
        snap.tokens = _text_prefix(decoded, answer, ends)
        snap.text = side.tokenizer.decode(snap.tokens, skip_special_tokens=True)
        snap.trace.append(event)
        emit(dataclasses.replace(snap, counters=dataclasses.replace(c), trace=list(snap.trace)))

    hook = side.model.register_forward_hook(count)
    try:
        out = generate(side.model, [ids], cfg, tokenizer=side.tokenizer, on_step=on_step)
    except Stopped:
        snap.status = "stopped"
    except Exception as err:  # shown on the page, e.g. a prompt that does not fit the context
        snap.status, snap.error = "error", f"{type(err).__name__}: {err}"
    else:
        s = out.stats
        snap.counters = Counters(s.tokens, s.tokens_with_end, s.forwards, s.total_s, final=True)
        snap.tokens, snap.text, snap.output = out.tokens[0], out.texts[0], out
        snap.status = "done"
    finally:
        hook.remove()
    emit(dataclasses.replace(snap, trace=list(snap.trace)))


def race_stream(
    sides: Sequence[Side],
    prompt: str,
    configs: Sequence[DecodeConfig],
    stop: threading.Event | None = None,
) -> Iterator[list[Snapshot]]:
    """Decode `prompt` with every side at once; yields the list of the sides' latest snapshots
    after each step of any side (steps that come faster than the consumer reads are merged), the
    last time when every side has finished. Setting `stop` ends every decode at its next step;
    closing the iterator sets it."""
    stop = stop or threading.Event()
    ids = [prompt_ids(s.tokenizer, prompt) for s in sides]  # ValueError before any thread
    latest = [Snapshot(s.label) for s in sides]
    inbox: queue.Queue = queue.Queue()
    threads = [
        threading.Thread(
            target=side_stream,
            args=(side, p, cfg, stop, lambda snap, i=i: inbox.put((i, snap))),
            name=f"d2f-demo-{side.label}",
            daemon=True,
        )
        for i, (side, p, cfg) in enumerate(zip(sides, ids, configs, strict=True))
    ]
    try:
        for t in threads:
            t.start()
        finished = 0
        while finished < len(sides):
            items = [inbox.get()]
            while True:  # merge whatever else has arrived
                try:
                    items.append(inbox.get_nowait())
                except queue.Empty:
                    break
            for i, snap in items:
                latest[i] = snap
                finished += snap.status in ("done", "stopped", "error")
            yield list(latest)
    finally:
        stop.set()  # the consumer went away (a closed page, Stop): end the decodes too
        for t in threads:
            t.join(timeout=30)


# -- the default models --------------------------------------------------------------------------


@dataclass(frozen=True)
class Models:
    """Where the demo's two models come from, and how the D2F side is labelled."""

    model: str | Path  # the dLLM (hub id or directory)
    adapter: str | Path | None  # its D2F LoRA adapter; None = the model under D2F undistilled
    ar_model: str | Path  # the autoregressive model
    label: str  # the D2F side's label


def quickstart_student(world: str, out: str | Path | None = None) -> Path | None:
    """The newest D2F student adapter the quickstart has cached for `world` (None when it has not
    run). `out` is the quickstart's `--out`, default its own default."""
    from d2f.tinyworld.quickstart import default_out

    out = Path(out) if out else default_out(world)
    # every cached stage is `cache/<stage>-<key>/` with a `.done` marker (d2f.tinyworld.stages.cached)
    done = sorted((out / "cache").glob("student-*/.done"), key=lambda p: p.stat().st_mtime)
    adapters = [p.parent / "adapter" for p in done if (p.parent / "adapter").is_dir()]
    return adapters[-1] if adapters else None


def resolve_models(
    world: str,
    model: str | None = None,
    adapter: str | None = None,
    ar_model: str | None = None,
    quickstart_out: str | Path | None = None,
) -> Models:
    """The demo's models. Default: the world's shipped teacher with the quickstart's student
    adapter when it is cached (else the teacher undistilled) and the world's shipped AR model.
    `adapter="none"` forces no adapter."""
    from d2f.tinyworld.pretrain import assets_dir

    if model is not None and ar_model is None:
        raise ValueError(
            f"--model {model}: give --ar-model too (the shipped AR model speaks only the "
            "miniature world's vocabulary)"
        )
    shipped = assets_dir(world)
    if model is None:
        model = shipped / "teacher"
        if adapter is None:
            adapter = quickstart_student(world, quickstart_out)
    if adapter == "none":
        adapter = None
    if adapter is None:
        label = f"{'teacher' if model == shipped / 'teacher' else 'model'} under D2F (undistilled)"
    else:
        label = "D2F student" if model == shipped / "teacher" else "D2F (with adapter)"
    return Models(model, adapter, ar_model or shipped / "ar", label)


def load_sides(models: Models, dtype=None, device=None) -> list[Side]:
    """Load both models (the adapter merged: faster, and the demo never needs the teacher pass)."""
    from d2f.models import load_model

    model, tok = load_model(
        models.model,
        adapter=models.adapter,
        dtype=dtype,
        device=device,
        merge_adapter=models.adapter is not None,
    )
    ar, ar_tok = load_model(models.ar_model, dtype=dtype, device=device)
    for name, t in (("--model", tok), ("--ar-model", ar_tok)):
        if t is None:
            raise ValueError(f"{name}: the checkpoint has no tokenizer files")
    if family_of(model).causal:
        raise ValueError(f"--model {models.model} is autoregressive: the D2F side needs a dLLM")
    if not family_of(ar).causal:
        raise ValueError(f"--ar-model {models.ar_model} is a dLLM: the AR side needs a causal LM")
    return [Side(models.label, model, tok), Side("autoregressive", ar, ar_tok)]


def held_out_problems(world: str, n: int = 20) -> list[tuple[str, str]]:
    """(question, reference answer) of the world's first `n` held-out problems."""
    from d2f.tinyworld.task import records
    from d2f.tinyworld.world import WORLDS

    spec = WORLDS[world]
    return [(r["question"], r["answer"]) for r in records(spec.level, "test", n, spec.seed)]
