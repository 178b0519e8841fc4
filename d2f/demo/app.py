"""The demo's Gradio page: a prompt, the decoding controls, one button, both sides streamed.

Why Gradio: it streams a Python generator's values to the page over its own queue, serves every
browser tab its own session (so concurrent tabs never see each other's streams), cancels a running
event from another button, and comes with a Python client for testing, all without a line of
JavaScript. Everything it needs (fonts included) is served by the local server; telemetry is off.
"""

from __future__ import annotations

import threading

import gradio as gr

from d2f.demo import engine, view
from d2f.demo.engine import PAPER, Side, Snapshot

# Stop events of the running generations, by Gradio session (one per browser tab)
_STOPS: dict[str, threading.Event] = {}
_STOPS_LOCK = threading.Lock()


def _message(snaps: list[Snapshot]) -> str:
    errors = [f"**{s.label}**: {s.error}" for s in snaps if s.error]
    if errors:
        return "\n\n".join(errors)
    if any(s.status == "stopped" for s in snaps):
        return "Stopped."
    if all(s.status == "done" for s in snaps):
        return "Both sides finished; the counters are `generate`'s `DecodeStats`."
    return "Decoding..."


def build(sides: list[Side], title: str, problems: list[tuple[str, str]]) -> gr.Blocks:
    """The page, for two loaded sides (D2F first, AR second) and the held-out problems to offer."""
    d2f_side, ar_side = sides
    answers = dict(problems)

    def run(prompt, strategy, block_size, tau_add, tau_act, tau_conf, max_new, request: gr.Request):
        try:
            configs = engine.settings(block_size, tau_add, tau_act, tau_conf, strategy, max_new)
            engine.prompt_ids(d2f_side.tokenizer, prompt)  # an empty prompt: say so, no threads
        except ValueError as err:
            yield f"**Cannot run:** {err}", gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        stop = threading.Event()
        key = request.session_hash or ""
        with _STOPS_LOCK:
            previous = _STOPS.get(key)
            if previous is not None:
                previous.set()  # one generation per tab: a new one ends the old one
            _STOPS[key] = stop
        try:
            for d2f_snap, ar_snap in engine.race_stream(sides, prompt, configs, stop):
                yield (
                    _message([d2f_snap, ar_snap]),
                    view.counters_html(d2f_snap),
                    d2f_snap.text,
                    view.pipeline_html(d2f_snap, d2f_side.tokenizer),
                    view.counters_html(ar_snap),
                    ar_snap.text,
                )
        finally:
            with _STOPS_LOCK:
                if _STOPS.get(key) is stop:
                    del _STOPS[key]

    def stop_run(request: gr.Request):
        with _STOPS_LOCK:
            stop = _STOPS.get(request.session_hash or "")
        if stop is not None:
            stop.set()

    def pick(question):
        if not question:
            return gr.skip(), ""
        return question, f"reference answer: `{answers.get(question, '')}`"

    with gr.Blocks(title="d2f demo", analytics_enabled=False) as page:
        gr.Markdown(f"# D2F against autoregressive decoding\n{title}")
        with gr.Row():
            prompt = gr.Textbox(label="prompt", lines=2, scale=3, elem_id="prompt")
            with gr.Column(scale=2):
                problem = gr.Dropdown(
                    [q for q, _ in problems],
                    value=None,
                    label="or pick a held-out problem",
                    visible=bool(problems),
                )
                reference = gr.Markdown()
        with gr.Accordion("decoding settings (D2F side; the paper's defaults)", open=True):
            with gr.Row():
                strategy = gr.Dropdown(list(engine.DLLM_STRATEGIES), value="d2f", label="strategy")
                block_size = gr.Number(
                    PAPER.block_size, label="block size", precision=None, elem_id="block-size"
                )
                tau_add = gr.Number(PAPER.tau_add, label="tau_add (add a block)")
                tau_act = gr.Number(PAPER.tau_act, label="tau_act (fully activate)")
                tau_conf = gr.Number(PAPER.tau_conf, label="tau_conf (commit)")
                max_new = gr.Number(0, label="max new tokens (0 = most that fit)", precision=None)
        with gr.Row():
            go = gr.Button("Generate both", variant="primary", elem_id="go")
            halt = gr.Button("Stop", variant="stop", elem_id="stop")
        message = gr.Markdown(elem_id="message")
        with gr.Row(equal_height=False):
            with gr.Column():
                d2f_counters = gr.HTML(elem_id="d2f-counters")
                d2f_text = gr.Textbox(label=f"{d2f_side.label}: answer", elem_id="d2f-answer")
                d2f_pipeline = gr.HTML(elem_id="d2f-pipeline")
            with gr.Column():
                ar_counters = gr.HTML(elem_id="ar-counters")
                ar_text = gr.Textbox(label=f"{ar_side.label}: answer", elem_id="ar-answer")
        problem.change(pick, problem, [prompt, reference])
        event = go.click(
            run,
            [prompt, strategy, block_size, tau_add, tau_act, tau_conf, max_new],
            [message, d2f_counters, d2f_text, d2f_pipeline, ar_counters, ar_text],
            api_name="generate",
        )
        halt.click(stop_run, None, None, cancels=[event], concurrency_limit=None, api_name="stop")
    return page


def launch(
    page: gr.Blocks,
    host: str = "127.0.0.1",
    port: int | None = None,
    concurrency: int = 4,
    block: bool = True,
):
    """Serve `page` on `host:port` (Gradio's default port when None); `concurrency` generations
    (tabs) decode at once, more wait in the queue. `block=False` returns once the server is up."""
    page.queue(default_concurrency_limit=concurrency)
    return page.launch(
        server_name=host,
        server_port=port,
        share=False,
        ssr_mode=False,
        prevent_thread_lock=not block,
        css=view.CSS,
        quiet=not block,
    )
