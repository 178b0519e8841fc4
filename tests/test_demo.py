"""The demo's generation logic and HTML, without a browser and without Gradio (d2f.demo.engine,
d2f.demo.view): the default models, streamed side by side, end as `generate` does."""

import os
import threading
import time

import pytest

from d2f.decoding import generate
from d2f.demo import engine, view
from d2f.tinyworld.pretrain import assets_dir

WORLD = "add2"


@pytest.fixture(scope="module")
def sides(tmp_path_factory):
    """The default sides, with an empty quickstart cache: the teacher undistilled, and the AR."""
    empty = tmp_path_factory.mktemp("no_quickstart")
    models = engine.resolve_models(WORLD, quickstart_out=empty)
    assert models.adapter is None and "undistilled" in models.label
    return engine.load_sides(models)


@pytest.fixture(scope="module")
def questions():
    return [q for q, _ in engine.held_out_problems(WORLD, 3)]


def _run(sides, prompt, configs, stop=None):
    snaps = list(engine.race_stream(sides, prompt, configs, stop))
    assert snaps, "the stream yielded nothing"
    return snaps


@pytest.mark.parametrize("block_size", [32, 8])  # the paper's default; one with blocks in flight
def test_stream_ends_as_generate_and_counters_are_decode_stats(sides, questions, block_size):
    configs = engine.settings(block_size, 0.1, 0.95, 0.9)
    snaps = _run(sides, questions[0], configs)
    for i, (side, cfg) in enumerate(zip(sides, configs, strict=True)):
        ref = generate(
            side.model, [engine.prompt_ids(side.tokenizer, questions[0])], cfg, side.tokenizer
        )
        final = snaps[-1][i]
        assert final.status == "done"
        assert final.tokens == ref.tokens[0] and final.text == ref.texts[0]
        s, c = ref.stats, final.counters
        assert c.final
        assert (c.tokens, c.tokens_with_end, c.forwards) == (
            s.tokens,
            s.tokens_with_end,
            s.forwards,
        )
        assert c.tokens_per_forward == pytest.approx(s.tokens_per_forward)
        # the live counters on the way: the last step's equal the call's, and never go down
        # (every emitted snapshot, read from side_stream itself: race_stream merges steps that
        # come faster than its reader, so what it yields depends on timing)
        emitted = []
        ids = engine.prompt_ids(side.tokenizer, questions[0])
        engine.side_stream(side, ids, cfg, threading.Event(), emitted.append)
        live = [snap.counters for snap in emitted if snap.status == "running"]
        assert live, f"{side.label}: no live snapshot"
        assert live[-1].forwards == s.forwards
        assert live[-1].tokens == s.tokens and live[-1].tokens_with_end == s.tokens_with_end
        for a, b in zip(live, live[1:], strict=False):
            assert a.forwards <= b.forwards and a.tokens <= b.tokens and a.seconds <= b.seconds
        # one step event per decoding step: the picture has the decode's rows
        assert len(final.trace) == len(
            generate(
                side.model,
                [engine.prompt_ids(side.tokenizer, questions[0])],
                cfg,
                record=True,
            ).trace
        )


def test_concurrent_streams_do_not_mix(sides, questions):
    """Two tabs at once on the same loaded models: each stream is its own prompt's decode."""
    configs = engine.settings(8, 0.1, 0.95, 0.9)
    results = {}

    def tab(name, prompt):
        results[name] = _run(sides, prompt, configs)[-1]

    threads = [threading.Thread(target=tab, args=(i, questions[i])) for i in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for n in (1, 2):
        for i, (side, cfg) in enumerate(zip(sides, configs, strict=True)):
            ids = engine.prompt_ids(side.tokenizer, questions[n])
            ref = generate(side.model, [ids], cfg, side.tokenizer)
            assert results[n][i].tokens == ref.tokens[0]
            # the forward hook counts only its own thread's calls
            assert results[n][i].counters.forwards == ref.stats.forwards


@pytest.mark.parametrize("which", [0, 1], ids=["d2f", "ar"])
def test_live_forward_counter_counts_only_its_own_decode(sides, questions, which):
    """Two decodes of the SAME model in flight at once (a barrier after each one's first step
    makes both forward hooks registered while both decode): each live counter counts only its own
    thread's model calls, so the last live count equals its decode's DecodeStats.forwards."""
    side, cfg = sides[which], engine.settings(8, 0.1, 0.95, 0.9)[which]
    barrier = threading.Barrier(2, timeout=60)
    emitted = {1: [], 2: []}

    def emit(n, snap):
        if not emitted[n]:
            barrier.wait()  # both decodes are past their first step: both hooks are on the model
        emitted[n].append(snap)

    def run(n):
        ids = engine.prompt_ids(side.tokenizer, questions[n])
        engine.side_stream(side, ids, cfg, threading.Event(), lambda s: emit(n, s))

    threads = [threading.Thread(target=run, args=(n,)) for n in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for n in (1, 2):
        ref = generate(side.model, [engine.prompt_ids(side.tokenizer, questions[n])], cfg)
        live = [s.counters for s in emitted[n] if s.status == "running"]
        assert emitted[n][-1].status == "done" and live
        assert live[-1].forwards == ref.stats.forwards


def test_stop_ends_both_decodes_at_their_next_step(sides, questions):
    stop = threading.Event()
    stop.set()  # pressed before the first step: each side stops at its first step
    t0 = time.perf_counter()
    snaps = _run(sides, questions[0], engine.settings(8, 0.1, 0.95, 0.9), stop)
    assert [s.status for s in snaps[-1]] == ["stopped", "stopped"]
    assert all(s.output is None and not s.trace for s in snaps[-1])
    assert time.perf_counter() - t0 < 30
    assert not [t for t in threading.enumerate() if t.name.startswith("d2f-demo-")]


def test_closing_the_stream_stops_the_decodes(sides, questions):
    """A page that goes away closes the generator: the decode threads end too."""
    cfgs = engine.settings(8, 0.1, 0.95, 0.9, max_new_tokens=96)
    stream = engine.race_stream(sides, questions[0], cfgs)
    next(stream)
    stream.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("d2f-demo-")]


@pytest.mark.parametrize(
    "args, message",
    [
        ((32, 1.5, 0.95, 0.9), "tau_add must be in [0, 1], got 1.5"),
        ((32, 0.1, -0.1, 0.9), "tau_act must be in [0, 1], got -0.1"),
        ((0, 0.1, 0.95, 0.9), "block_size must be > 0, got 0"),
        ((2.5, 0.1, 0.95, 0.9), "block_size must be a whole number, got 2.5"),
        ((32, None, 0.95, 0.9), "tau_add must be a number, got None"),
        ((32, 0.1, 0.95, 0.9, "ar"), "strategy must be one of d2f, cache_only"),
        ((32, 0.1, 0.95, 0.9, "d2f", 8), "max_new_tokens (8) must be >= block_size (32)"),
    ],
)
def test_bad_settings_are_a_message(args, message):
    with pytest.raises(ValueError) as err:
        engine.settings(*args)
    assert message in str(err.value)


def test_settings_defaults_are_the_papers():
    d2f_cfg, ar_cfg = engine.settings(32.0, 0.1, 0.95, 0.9, "d2f", 0)  # as the page sends them
    assert (d2f_cfg.block_size, d2f_cfg.tau_add, d2f_cfg.tau_act, d2f_cfg.tau_conf) == (
        32,
        0.1,
        0.95,
        0.9,
    )
    assert d2f_cfg.max_new_tokens is None and ar_cfg.strategy == "ar"


def test_a_side_error_is_shown_not_raised(sides):
    """A prompt too long for the context ends that side with a message, not a traceback."""
    long = " ".join(["tom has 5 apples ."] * 40)
    snaps = _run(sides, long, engine.settings(32, 0.1, 0.95, 0.9))
    assert [s.status for s in snaps[-1]] == ["error", "error"]
    assert "ValueError" in snaps[-1][0].error and "context" in snaps[-1][0].error
    assert "context" in view.counters_html(snaps[-1][0])
    with pytest.raises(ValueError, match="empty"):
        next(engine.race_stream(sides, "  ", engine.settings(32, 0.1, 0.95, 0.9)))


def test_pipeline_html_draws_the_latest_step(sides, questions):
    snaps = _run(sides, questions[0], engine.settings(8, 0.1, 0.95, 0.9))
    d2f_side = sides[0]
    # a step with two blocks in flight, one semi- and one fully activated
    for n in range(1, len(snaps[-1][0].trace) + 1):
        partial = engine.Snapshot("x", trace=snaps[-1][0].trace[:n])
        states = partial.trace[-1].block_state[0].tolist()
        if 1 in states and 2 in states:
            break
    else:
        pytest.fail("no step with a semi- and a fully activated block")
    page = view.pipeline_html(partial, d2f_side.tokenizer)
    live = [s for s in states if s != 0]
    assert page.count("class='d2f-block'") == len(live)
    assert "block 0: fully activated" in page
    assert f"block {states.index(1)}: semi-activated" in page
    committed = int(partial.trace[-1].committed[0].sum())
    assert f"{committed} token(s) committed in this step" in page
    # the decode picture below: one table row per step so far
    assert page.count("<tr>") == n


def test_counters_html_shows_the_numbers():
    c = engine.Counters(tokens=17, tokens_with_end=18, forwards=6, seconds=0.5, final=True)
    page = view.counters_html(engine.Snapshot("D2F student", counters=c, status="done"))
    for name, value in (("tokens", "17"), ("forwards", "6"), ("tokens / forward", "3.00")):
        assert f"data-counter='{name}'>{value}<" in page
    assert "data-counter='tokens / s'>34<" in page
    assert "D2F student" in page and "DecodeStats" in page


def test_default_models_pick_the_quickstarts_newest_student(tmp_path):
    cache = tmp_path / "cache"
    for name, done, when in (
        ("student-aaa", True, 100),
        ("student-bbb", True, 200),  # the newest complete one
        ("student-ccc", False, 300),  # not finished: no .done
        ("student_random-ddd", True, 400),  # the ablation's student, not D2F's
    ):
        (cache / name / "adapter").mkdir(parents=True)
        if done:
            (cache / name / ".done").write_text("1 s\n")
            os.utime(cache / name / ".done", (when, when))
    assert engine.quickstart_student(WORLD, tmp_path) == cache / "student-bbb" / "adapter"
    models = engine.resolve_models(WORLD, quickstart_out=tmp_path)
    assert models.adapter == cache / "student-bbb" / "adapter"
    assert models.label == "D2F student"
    assert (
        models.model == assets_dir(WORLD) / "teacher"
        and models.ar_model == assets_dir(WORLD) / "ar"
    )
    assert engine.resolve_models(WORLD, adapter="none", quickstart_out=tmp_path).adapter is None
    assert engine.quickstart_student(WORLD, tmp_path / "nothing") is None


def test_default_models_follow_the_world():
    models = engine.resolve_models("chain", quickstart_out="/nonexistent")
    assert models.model == assets_dir("chain") / "teacher"
    assert models.ar_model == assets_dir("chain") / "ar"


def test_a_model_of_ones_own_needs_an_ar_model():
    with pytest.raises(ValueError, match="--ar-model"):
        engine.resolve_models(WORLD, model="GSAI-ML/LLaDA-8B-Instruct")
    models = engine.resolve_models(WORLD, model="m", ar_model="a")
    assert (models.model, models.adapter, models.ar_model) == ("m", None, "a")
    assert "undistilled" in models.label


@pytest.mark.slow  # a fresh interpreter importing d2f: ~10 s
def test_import_needs_no_gradio():
    import subprocess
    import sys

    code = (
        "import sys; import d2f, d2f.demo, d2f.demo.engine, d2f.demo.view; "
        "assert 'gradio' not in sys.modules, 'gradio imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})
