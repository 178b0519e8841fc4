"""The decode picture: a recorded decode as a step x position grid, like the paper's Figure 4.

Each row of the picture is one decoding step, each column one answer position. A cell shows the
position's state during that step: not added yet, undecoded in a semi-activated block, undecoded in
a fully activated block, committed in this step, or decoded earlier. Record with
`generate(..., record=True)`, then `render_png(out.trace, "decode.png", row=0)` or
`render_html(out.trace, "decode.html", row=0, tokenizer=tok)`.
"""

from __future__ import annotations

import html
from pathlib import Path

import torch

from d2f.decoding.config import BlockState, StepEvent

# cell codes and their colours / legend: the block states, then two codes of the picture's own
ABSENT, SEMI, FULL = int(BlockState.ABSENT), int(BlockState.SEMI), int(BlockState.FULL)
NEW, OLD = 3, 4
COLOURS = {ABSENT: "#ffffff", SEMI: "#c6dbef", FULL: "#6baed6", NEW: "#e6550d", OLD: "#bdbdbd"}
LEGEND = {
    ABSENT: "block not added",
    SEMI: "masked, semi-activated",
    FULL: "masked, fully activated",
    NEW: "committed this step",
    OLD: "decoded earlier",
}


def decode_grid(trace: list[StepEvent], row: int = 0) -> torch.Tensor:
    """(steps, G) int grid of cell codes for prompt `row` of a recorded decode."""
    cells, decoded = [], None
    for event in trace:
        where = (event.rows == row).nonzero()
        if len(where) == 0:
            continue  # the row had finished, or had not started
        i = int(where[0, 0])
        committed = event.committed[i]  # (G,)
        G = committed.shape[0]
        decoded = torch.zeros_like(committed) if decoded is None else decoded
        if event.block_state is not None:
            bs = G // event.block_state.shape[1]
            state = event.block_state[i].long().repeat_interleave(bs)
        else:  # strategies without block states: every position counts as active
            state = torch.full((G,), FULL)
        grid = torch.where(decoded, OLD, state)  # undecoded cells show their block's state
        cells.append(torch.where(committed, NEW, grid))
        decoded = decoded | committed
    if not cells:
        raise ValueError(f"row {row} does not appear in the trace")
    return torch.stack(cells)


def render_png(
    trace: list[StepEvent], path: str | Path, row: int = 0, title: str | None = None
) -> Path:
    """Save the decode picture of prompt `row` as a PNG at exactly `path` (matplotlib, no
    display needed); returns `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    grid = decode_grid(trace, row)
    steps, G = grid.shape
    fig, ax = plt.subplots(
        figsize=(min(max(8, 2 + G * 0.18), 24), min(max(2.5, 1.5 + steps * 0.25), 24))
    )
    cmap = ListedColormap([COLOURS[k] for k in sorted(COLOURS)])
    ax.imshow(
        grid.numpy(),
        cmap=cmap,
        vmin=0,
        vmax=len(COLOURS) - 1,
        aspect="auto",
        interpolation="nearest",
    )
    ax.set_xlabel("answer position")
    ax.set_ylabel("decoding step")
    ax.set_title(title or f"D2F decode of prompt {row}: {steps} steps, {G} positions", fontsize=9)
    handles = [Patch(facecolor=COLOURS[k], edgecolor="#555", label=v) for k, v in LEGEND.items()]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, format="png")  # NOTE: without format= a bare name gets ".png"
    plt.close(fig)
    return path


def render_html(trace: list[StepEvent], path: str | Path, row: int = 0, tokenizer=None) -> Path:
    """Save the decode picture as an HTML page (`decode_html`); returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<html><body>{decode_html(trace, row, tokenizer)}</body></html>\n")
    return path


def legend_html() -> str:
    """The picture's legend: one coloured swatch per cell code."""
    return " ".join(
        f"<span style='background:{COLOURS[k]};padding:0 8px;border:1px solid #999'>{v}</span>"
        for k, v in LEGEND.items()
    )


def decode_html(trace: list[StepEvent], row: int = 0, tokenizer=None) -> str:
    """The decode picture as an HTML fragment (the legend, then a table with one row per step);
    committed cells show their token."""
    grid = decode_grid(trace, row)
    events = [e for e in trace if bool((e.rows == row).any())]
    out = ["<table style='border-collapse:collapse;font:11px monospace'>"]
    for step, (cells, event) in enumerate(zip(grid.tolist(), events, strict=True), 1):
        i = int((event.rows == row).nonzero()[0, 0])
        tokens = event.answer[i].tolist()
        out.append(f"<tr><td style='padding:0 6px'>{step}</td>")
        for pos, code in enumerate(cells):
            text = ""
            if code == NEW:
                tok = tokens[pos]
                text = html.escape(tokenizer.decode([tok]) if tokenizer is not None else str(tok))
            out.append(
                f"<td title='{LEGEND[code]}' style='background:{COLOURS[code]};"
                f"border:1px solid #eee;min-width:14px;height:14px'>{text}</td>"
            )
        out.append("</tr>")
    out.append("</table>")
    return f"<p>{legend_html()}</p>{''.join(out)}"
