"""HTML of the demo page's live parts, from `d2f.demo.engine.Snapshot`s (no Gradio here).

`counters_html` is a side's counter strip; `pipeline_html` draws the D2F side's block pipeline
now (one box per answer block that exists: semi- or fully activated, each cell coloured as in the
decode picture, the cells committed in this step in its "committed" colour) above the decode
picture of every step so far (`d2f.render.decode_html`).
"""

from __future__ import annotations

import html

from d2f.decoding.config import BlockState
from d2f.demo.engine import Snapshot
from d2f.render import COLOURS, LEGEND, NEW, OLD, decode_grid, decode_html

STATE_NAMES = {
    int(BlockState.ABSENT): "not added",
    int(BlockState.SEMI): "semi-activated",
    int(BlockState.FULL): "fully activated",
}
STATUS = {
    "waiting": "waiting",
    "running": "decoding...",
    "done": "done",
    "stopped": "stopped",
    "error": "error",
}


def counters_html(snap: Snapshot) -> str:
    """The side's label, status and counters (tokens, forwards, tokens/forward, tokens/s)."""
    c = snap.counters
    cells = [
        ("tokens", f"{c.tokens}"),
        ("forwards", f"{c.forwards}"),
        ("tokens / forward", f"{c.tokens_per_forward:.2f}"),
        ("tokens / s", f"{c.tokens_per_second:.0f}"),
    ]
    body = "".join(
        f"<div class='d2f-counter'><div class='d2f-value' data-counter='{name}'>{value}</div>"
        f"<div class='d2f-name'>{name}</div></div>"
        for name, value in cells
    )
    status = STATUS[snap.status] + (" (DecodeStats)" if c.final else "")
    error = f"<div class='d2f-error'>{html.escape(snap.error)}</div>" if snap.error else ""
    return (
        f"<div class='d2f-side'><b>{html.escape(snap.label)}</b> "
        f"<span class='d2f-status' data-status='{snap.status}'>{status}</span>"
        f"<div class='d2f-counters'>{body}</div>{error}</div>"
    )


def pipeline_html(snap: Snapshot, tokenizer) -> str:
    """The block pipeline at the latest step, then the decode picture of every step so far."""
    if not snap.trace:
        return "<p>the block pipeline appears here while the D2F side decodes</p>"
    cells = decode_grid(snap.trace)[-1].tolist()  # (G,) cell codes of the latest step
    event = snap.trace[-1]
    i = int((event.rows == 0).nonzero()[0, 0]) if bool((event.rows == 0).any()) else 0
    answer = event.answer[i].tolist()
    states = None if event.block_state is None else event.block_state[i].tolist()
    bs = len(cells) // (len(states) if states else 1)
    boxes = []
    for k in range(0, len(cells), bs):
        state = None if states is None else states[k // bs]
        if state == int(BlockState.ABSENT):
            continue  # not added yet: not drawn, as the pipeline has not created it
        spans = []
        for pos in range(k, k + bs):
            code = cells[pos]
            tok = html.escape(tokenizer.decode([answer[pos]])) if code in (NEW, OLD) else "&middot;"
            spans.append(
                f"<span class='d2f-cell' title='{LEGEND[code]}' "
                f"style='background:{COLOURS[code]}'>{tok or '&nbsp;'}</span>"
            )
        name = "" if state is None else f": {STATE_NAMES[state]}"
        boxes.append(
            f"<div class='d2f-block'><div class='d2f-block-name'>block {k // bs}{name}</div>"
            f"{''.join(spans)}</div>"
        )
    committed = sum(c == NEW for c in cells)
    head = (
        f"<p>step {len(snap.trace)}: {len(boxes)} block(s) in the pipeline, "
        f"{committed} token(s) committed in this step</p>"
    )
    picture = decode_html(snap.trace, 0, tokenizer)
    return (
        f"<div class='d2f-pipeline'>{head}"
        f"<div class='d2f-blocks'>{''.join(boxes)}</div>"
        f"<details open><summary>decode picture (one row per step)</summary>"
        f"<div class='d2f-picture'>{picture}</div></details>"
        "</div>"
    )


CSS = """
.d2f-counters { display: flex; gap: 18px; margin: 6px 0; }
.d2f-counter { text-align: center; }
.d2f-value { font-size: 1.5em; font-weight: bold; font-variant-numeric: tabular-nums; }
.d2f-name { font-size: 0.8em; opacity: 0.7; }
.d2f-error { color: #b00; white-space: pre-wrap; }
.d2f-picture { overflow-x: auto; max-width: 100%; }
.d2f-blocks { display: flex; flex-wrap: wrap; gap: 8px; margin: 6px 0; }
.d2f-block { border: 2px solid #555; padding: 2px; }
.d2f-block-name { font-size: 0.75em; }
.d2f-cell { display: inline-block; min-width: 1.4em; margin: 1px; text-align: center;
  font: 12px monospace; padding: 2px 1px; }
"""
