"""The decode picture and the streaming CLI."""

import dataclasses
import io
from pathlib import Path

import pytest
import torch

import d2f
from d2f.decoding import DecodeConfig, StepEvent, generate
from d2f.generate import StreamPrinter, main
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


def test_cli_merges_the_adapter_by_default_and_says_so(tiny_dir, capsys, tmp_path):
    """--adapter is folded into the weights unless --no-merge_adapter; the text is the same."""
    from peft import LoraConfig, get_peft_model

    from d2f.adapters import save_adapter

    base, _ = load_model(tiny_dir("llada"))
    torch.manual_seed(0)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    save_adapter(get_peft_model(base, lora), tmp_path / "ad")
    argv = ["--model", str(tiny_dir("llada")), "--adapter", str(tmp_path / "ad")]
    argv += ["--prompt", "how many apples ?", "--block_size", "4", "--max_new_tokens", "8"]
    printed = {}
    for flag in ("--merge_adapter", "--no-merge_adapter", None):
        main(argv + ([flag] if flag else []))
        printed[flag] = capsys.readouterr().out
    for flag in (None, "--merge_adapter"):  # merging is the default
        assert f"[adapter] {tmp_path / 'ad'}: merged into the weights" in printed[flag]
    assert "unmerged (--no-merge_adapter)" in printed["--no-merge_adapter"]
    text = {k: v.split("\n\n[d2f]")[0] for k, v in printed.items()}
    assert text[None] == text["--no-merge_adapter"] == text["--merge_adapter"]


def test_cli_bad_values_fail_cleanly(tiny_dir, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--model", str(tiny_dir("llada")), "--prompt", "x", "--tau_conf", "2"])
    assert exc.value.code == 2 and "tau_conf must be in [0, 1]" in capsys.readouterr().err


ASSETS = Path(d2f.__file__).parent / "tinyworld" / "assets"


@pytest.mark.parametrize("which", ["teacher", "ar", "tiny_llada"])
def test_cli_readme_form_works_with_defaults(which, tiny_dir, capsys):
    """`python -m d2f.generate --model DIR --prompt ...` with every default, on the shipped tiny
    models (context 128) and a `python -m d2f.tiny` checkpoint (context 512)."""
    model = str(tiny_dir("llada")) if which == "tiny_llada" else str(ASSETS / which)
    main(["--model", model, "--prompt", "what is 3 plus 4 ?"])
    printed = capsys.readouterr().out
    strategy = "ar" if which == "ar" else "d2f"
    assert f"[{strategy}] 1 rows" in printed and "tokens/forward" in printed


def test_cli_impossible_length_is_a_clean_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--model", str(ASSETS / "teacher"), "--prompt", "x", "--max_new_tokens", "512"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "use max_new_tokens at most 96" in err


def test_cli_help_documents_every_decode_option(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    from d2f.decoding.config import field_help

    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert exc.value.code == 0
    helps = field_help()
    assert set(helps) == {f.name for f in dataclasses.fields(DecodeConfig)}
    for f in dataclasses.fields(DecodeConfig):
        assert f"--{f.name}" in text
        assert " ".join(helps[f.name].split()) in text, f.name
    for f in dataclasses.fields(DecodeConfig):
        if f.name != "strategy":
            assert f"(default: {f.default})" in text
    assert "--chat, --no-chat" in text and "--truncate_prompt, --no-truncate_prompt" in text


def test_cli_boolean_flags_are_flags(tiny_dir, capsys):
    main(
        [
            "--model",
            str(tiny_dir("llada")),
            "--prompt",
            "how many apples ?",
            "--no-chat",
            "--truncate_prompt",
            "--block_size",
            "4",
            "--max_new_tokens",
            "8",
        ]
    )
    assert "[d2f] 1 rows" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--picture", "decode"], "must end in .png or .html"),
        (["--device", "tpu9"], "is not a torch device"),
        (["--block_size", "4.5"], "invalid int value"),
    ],
)
def test_cli_refuses_before_loading(extra, match, capsys, tmp_path):
    """Refused before any load: the model path does not even exist."""
    with pytest.raises(SystemExit) as exc:
        main(["--model", str(tmp_path / "none"), "--prompt", "x", *extra])
    assert exc.value.code == 2 and match in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine with no CUDA")
def test_cli_cuda_without_cuda(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["--model", str(tmp_path / "none"), "--prompt", "x", "--device", "cuda"])
    assert exc.value.code == 2 and "--device cuda: CUDA is not available" in capsys.readouterr().err


def test_render_png_writes_the_path_it_returns(traced, tmp_path):
    """A name without a suffix is written as given (matplotlib would append .png)."""
    out, _ = traced
    path = render_png(out.trace, tmp_path / "decode")
    assert path == tmp_path / "decode" and path.read_bytes()[:4] == b"\x89PNG"


def test_stream_stops_at_the_first_end_token(traced):
    """Streaming shows what the final text shows: nothing after the first end token (vanilla
    decodes positions after it), nothing after the first undecoded position."""
    _, tok = traced
    words = [tok.convert_tokens_to_ids(w) for w in ("how", "many", "apples", "left")]
    end, mask = 0, 2  # the tiny LLaDA's <|endoftext|> and <|mdm_mask|>
    sink = io.StringIO()
    printer = StreamPrinter(tok, mask, end_ids=(end,), out=sink)

    def step(answer):
        n = len(answer)
        printer(
            StepEvent(
                1,
                torch.tensor([0]),
                torch.tensor([answer]),
                torch.zeros(1, n, dtype=torch.bool),
                None,
            )
        )

    step([words[0], mask, mask, mask, words[3]])
    assert sink.getvalue() == "how"
    step([words[0], words[1], end, mask, words[3]])
    step([words[0], words[1], end, words[2], words[3]])
    assert sink.getvalue() == tok.decode(words[:2], skip_special_tokens=True) == "how many"
