"""The decode picture and the streaming CLI."""

import pytest
import torch

from d2f.decoding import DecodeConfig, generate
from d2f.generate import main
from d2f.models import load_model
from d2f.render import ABSENT, FULL, NEW, OLD, SEMI, decode_grid, render_html, render_png


@pytest.fixture(scope="module")
def traced(tiny_dir):
    model, tok = load_model(tiny_dir("llada"))
    with torch.no_grad():
        model.lm_head.weight.mul_(12.0)
    cfg = DecodeConfig(block_size=4, max_new_tokens=16, tau_add=0.25, tau_act=0.75, tau_conf=0.6)
    out = generate(model, [[10, 11, 12], [13, 14, 15, 16, 17]], cfg, record=True)
    return out, tok


def test_grid_follows_the_trace(traced):
    out, _ = traced
    grid = decode_grid(out.trace, row=1)
    steps = [e for e in out.trace if bool((e.rows == 1).any())]
    assert grid.shape == (len(steps), 16)
    assert grid[0, 12:].eq(ABSENT).all()  # only the first block(s) exist at step 1
    assert torch.isin(
        grid[0, :4], torch.tensor([FULL, NEW])
    ).all()  # the first block is fully active
    assert (grid == SEMI).any()  # pipelining: some semi-activated block appeared
    assert ((grid == NEW).sum(0) == 1).all()  # every position committed exactly once
    last = grid[-1]
    assert ((last == OLD) | (last == NEW)).all()
    with pytest.raises(ValueError, match="row 5"):
        decode_grid(out.trace, row=5)


def test_png_and_html(traced, tmp_path):
    out, tok = traced
    png = render_png(out.trace, tmp_path / "d.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = render_html(out.trace, tmp_path / "d.html", row=0, tokenizer=tok).read_text()
    assert "committed this step" in page and page.count("<tr>") == len(decode_grid(out.trace, 0))


def test_cli_streams_and_reports(tiny_dir, capsys, tmp_path):
    main(
        [
            "--model",
            str(tiny_dir("llada")),
            "--prompt",
            "how many apples ?",
            "--block_size",
            "4",
            "--max_new_tokens",
            "8",
            "--picture",
            str(tmp_path / "p.png"),
        ]
    )
    printed = capsys.readouterr().out
    assert "[d2f]" in printed and "tokens/forward" in printed
    assert (tmp_path / "p.png").exists()


def test_cli_bad_values_fail_cleanly(tiny_dir, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--model", str(tiny_dir("llada")), "--prompt", "x", "--tau_conf", "2"])
    assert exc.value.code == 2 and "tau_conf must be in [0, 1]" in capsys.readouterr().err
