"""The lm-eval model `d2f` and the `python -m d2f.eval` launcher, on tiny models and local tasks."""

import glob
import json
import os
import random
import shutil
import subprocess
import sys
from functools import partialmethod
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance

from d2f.mask import to_additive

ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def _run(args, **kwargs):
    return subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=300, **kwargs)


def _eval_cmd(model_dir, out, extra_args=""):
    return [
        "-m",
        "d2f.eval",
        "--model",
        "d2f",
        "--model_args",
        f"pretrained={model_dir},block_size=4,max_new_tokens=16{extra_args}",
        "--tasks",
        "d2f_gsm8k_local",
        "--batch_size",
        "2",
        "--output_path",
        str(out),
        "--log_samples",
    ]


def _samples(out):
    (path,) = glob.glob(f"{out}/*/samples_d2f_gsm8k_local_*.jsonl")
    lines = Path(path).read_text().splitlines()
    return {s["doc_id"]: s for s in map(json.loads, lines)}


@pytest.fixture(scope="module")
def one_process(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval1")
    proc = _run([sys.executable, *_eval_cmd(tiny_dir("llada"), out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_end_to_end_results_samples_and_speed(one_process, tiny_dir):
    from d2f.models import load_tokenizer

    out = one_process
    (results_path,) = glob.glob(f"{out}/*/results_*.json")
    results = json.loads(Path(results_path).read_text())["results"]["d2f_gsm8k_local"]
    assert "exact_match,strict-match" in results and "exact_match,flexible-extract" in results
    samples = _samples(out)
    speed = json.loads((out / "d2f_speed.json").read_text())
    task = speed["tasks"]["d2f_gsm8k_local"]
    assert task["samples"] == len(samples) == 8
    tok = load_tokenizer(tiny_dir("llada"))
    logged = sum(
        len(tok(s["resps"][0][0], add_special_tokens=False)["input_ids"]) for s in samples.values()
    )
    assert task["tokens"] == logged
    assert task["tokens_per_forward"] == pytest.approx(task["tokens_with_end"] / task["forwards"])
    assert task["tokens_per_second"] == pytest.approx(task["tokens"] / task["wall_s"])
    assert speed["model_args"]["strategy"] == "d2f" and speed["model_args"]["block_size"] == 4


def test_two_processes_match_one(one_process, tiny_dir, tmp_path):
    out = tmp_path / "eval2"
    launch = [
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--main_process_port",
        "29617",
    ]
    # NOTE: `accelerate launch --cpu` starts one process only; this is the CPU multi-process form
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            *launch,
            *_eval_cmd(tiny_dir("llada"), out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**ENV, "ACCELERATE_USE_CPU": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _samples(one_process), _samples(out)
    assert one.keys() == two.keys()
    assert all(one[k]["resps"] == two[k]["resps"] for k in one)
    speed = json.loads((out / "d2f_speed.json").read_text())
    assert speed["world_size"] == 2 and [
        r["tasks"]["d2f_gsm8k_local"]["samples"] for r in speed["ranks"]
    ] == [4, 4]


@pytest.fixture
def no_model_load(monkeypatch):
    """`python -m d2f.eval` in process, where loading the weights fails the test. lm-eval's
    built-in task index (~10k files, 25 s) is left out: only our tasks are searched."""
    import lm_eval.tasks.manager

    import d2f.lmeval.lm

    def loaded(*args, **kwargs):
        raise AssertionError("the model weights were loaded")

    monkeypatch.setattr(d2f.lmeval.lm, "load_model", loaded)
    manager = lm_eval.tasks.manager.TaskManager
    init = manager.__init__
    monkeypatch.setattr(manager, "__init__", partialmethod(init, include_defaults=False))
    for name in ENV:
        monkeypatch.setenv(name, ENV[name])

    def run(*args: str) -> None:
        from d2f.eval import main

        main(list(args))

    return run


def _model_args(pretrained, extra=""):
    return ["--model", "d2f", "--model_args", f"pretrained={pretrained}{extra}"]


@pytest.mark.parametrize(
    "extra,error,match",
    [
        (",strategy=beam", ValueError, "strategy must be one of"),
        (
            ",adapter=/nonexistent/ad",
            FileNotFoundError,
            "adapter /nonexistent/ad: no such directory",
        ),
        # every known key is listed, not only the decode settings
        (
            ",blocksize=4",
            ValueError,
            r"unknown \['blocksize'\]; known: .*'adapter'.*'mc_samples'.*'pretrained'",
        ),
    ],
)
def test_bad_model_args_fail_before_model_load(no_model_load, extra, error, match):
    with pytest.raises(error, match=match):
        no_model_load(*_model_args("/nonexistent/m", extra), "--tasks", "d2f_gsm8k_local")


def test_unknown_task_fails_before_model_load(no_model_load):
    with pytest.raises(ValueError, match="Tasks not found: no_such_task"):
        no_model_load(*_model_args("/nonexistent/m"), "--tasks", "no_such_task")


def test_ar_strategy_on_a_dllm_fails_before_model_load(no_model_load, tiny_dir):
    with pytest.raises(ValueError, match="strategy 'ar' needs an autoregressive model"):
        no_model_load(*_model_args(tiny_dir("llada"), ",strategy=ar"), "--tasks", "d2f_gsm8k_local")


def test_unsafe_code_task_needs_confirmation_before_model_load(no_model_load, tiny_dir):
    with pytest.raises(ValueError, match="d2f_code_local which is marked as unsafe"):
        no_model_load(*_model_args(tiny_dir("llada")), "--tasks", "d2f_code_local")


def test_local_task_with_empty_data_fails_before_model_load(no_model_load, tiny_dir, tmp_path):
    """Our d2f_gsm8k_local task and loader, copied next to an empty data file."""
    from d2f.eval import tasks_dir

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "gsm8k_local.jsonl").write_text("\n")
    shutil.copy(tasks_dir() / "gsm8k_utils.py", tmp_path)
    task = (tasks_dir() / "d2f_gsm8k_local.yaml").read_text()
    (tmp_path / "empty.yaml").write_text(task.replace("task: d2f_gsm8k_local", "task: d2f_empty"))
    with pytest.raises(ValueError, match=r"data/gsm8k_local.jsonl: no records"):
        no_model_load(
            *_model_args(tiny_dir("llada")), "--tasks", "d2f_empty", "--include_path", str(tmp_path)
        )


@pytest.fixture(scope="module")
def lm(tiny_dir):
    from d2f.lmeval.lm import D2FLM

    return D2FLM(pretrained=str(tiny_dir("llada")), block_size=4, max_new_tokens=16, mc_samples=8)


def test_generate_until_cuts_at_stop_strings_and_counts(lm):
    ctx = "Question: how many apples ?\nAnswer:"
    free = lm.generate_until(
        [Instance("generate_until", {}, (ctx, {"until": []}), 0, ("t_free", 0, 1))],
        disable_tqdm=True,
    )[0]
    words = free.split()
    assert len(words) > 3
    stop = words[2]
    cut = lm.generate_until(
        [Instance("generate_until", {}, (ctx, {"until": [stop]}), 0, ("t_cut", 0, 1))],
        disable_tqdm=True,
    )[0]
    assert cut == free[: free.index(stop)]
    counted = lm.speed.tasks["t_cut"].tokens
    assert counted == len(lm.tok_encode(cut)) < lm.speed.tasks["t_free"].tokens


def test_generate_until_without_any_length_fits_the_context(tiny_dir):
    """No `max_new_tokens` model arg and no `max_gen_toks` in the task: the decoder's default (the
    most whole blocks that fit the context) is used, not an error."""
    from d2f.lmeval.lm import D2FLM

    lm = D2FLM(pretrained=str(tiny_dir("llada")), block_size=4)
    ctx = "Question: how many apples ?\nAnswer:"
    (text,) = lm.generate_until(
        [Instance("generate_until", {}, (ctx, {"until": []}), 0, ("t_fit", 0, 1))],
        disable_tqdm=True,
    )
    assert isinstance(text, str) and lm.speed.tasks["t_fit"].tokens > 16


def test_generate_until_batches_by_task_and_settings_in_callers_order(lm):
    """Collator groups by (task, generation settings) and sorts by length; the texts come back in
    the order of the requests, and each task's speed counts its own samples."""
    from d2f.lmeval.lm import D2FLM

    batched = D2FLM(pretrained=lm.model_args["pretrained"], block_size=4, max_new_tokens=8)
    batched.batch_size = 2
    contexts = ["how many", "how many apples", "apples are there now", "how many apples are there"]
    reqs = [
        Instance("generate_until", {}, (c, {"until": [] if i % 2 else ["are"]}), i, (t, i, 1))
        for i, (c, t) in enumerate(zip(contexts, ["a", "b", "a", "b"], strict=True))
    ]
    forward = batched.generate_until(reqs, disable_tqdm=True)
    backward = batched.generate_until(reqs[::-1], disable_tqdm=True)[::-1]
    assert forward == backward
    assert all("are" not in t for t in forward[::2])  # task a's stop string applied to task a
    assert {t: s.samples for t, s in batched.speed.tasks.items()} == {"a": 4, "b": 4}


def test_generate_until_with_the_compiled_step_gives_the_same_texts(lm):
    """The model args `kv_cache=static,compile=eager` (what `ENGINE=` in the eval scripts adds):
    batched requests through the traced step (fullgraph) give the eager decoder's texts."""
    from d2f.lmeval.lm import D2FLM

    texts = {}
    for engine in ({}, {"kv_cache": "static", "compile": "eager"}):
        model = D2FLM(
            pretrained=lm.model_args["pretrained"], block_size=4, max_new_tokens=8, **engine
        )
        model.batch_size = 2
        assert model.decode.compile == engine.get("compile", "off")
        reqs = [
            Instance("generate_until", {}, (c, {"until": []}), i, ("t", i, 1))
            for i, c in enumerate(["how many", "how many apples are there", "apples"])
        ]
        texts[bool(engine)] = model.generate_until(reqs, disable_tqdm=True)
    assert texts[True] == texts[False]
    assert all(texts[False])


def test_prompt_gets_exactly_one_bos(lm):
    bos = lm.tokenizer.bos_token_id
    plain = lm._prompt_ids("how many apples ?")
    chat = lm._prompt_ids(
        lm.apply_chat_template([{"role": "user", "content": "how many apples ?"}])
    )
    assert plain[0] == bos and plain[1] != bos
    assert chat[0] == bos and chat[1] != bos


def test_loglikelihood_context_gets_exactly_one_bos(lm):
    """Multiple-choice contexts see the same single BOS as generation prompts."""
    bos = lm.tokenizer.bos_token_id
    ctx, cont = lm._encode_pair("how many apples", " are there")
    assert ctx == lm._prompt_ids("how many apples") and ctx[0] == bos and ctx[1] != bos
    assert cont == lm.tok_encode("are there")
    chat = lm.apply_chat_template([{"role": "user", "content": "how many apples ?"}])
    ctx, _ = lm._encode_pair(chat, "are")
    assert ctx[0] == bos and ctx[1] != bos
    assert lm.prefix_token_id == bos  # an empty context is the BOS alone


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_loglikelihood_single_token_is_exact(tiny_dir, family):
    """With a 1-token continuation the MC estimate has k = 1 always: it equals log p(token) at the
    masked position, computed here by hand from one forward (Dream: the logits one row earlier)."""
    from d2f.lmeval.lm import D2FLM

    lm = D2FLM(pretrained=str(tiny_dir(family)), block_size=4, max_new_tokens=16, mc_samples=4)
    ctx, cont = lm.tok_encode("how many apples"), lm.tok_encode("are")[:1]
    ((ll, _),) = lm._loglikelihood_tokens([(("", ""), ctx, cont)], disable_tqdm=True)
    mask = lm.family.mask_token_id
    ids = torch.tensor([ctx + [mask]])
    with torch.no_grad():
        logits = lm.model(
            input_ids=ids,
            attention_mask=to_additive(torch.ones(1, len(ctx) + 1, len(ctx) + 1, dtype=torch.bool)),
        ).logits
    row = len(ctx) - 1 if family == "dream" else len(ctx)  # Dream: row i - 1 predicts token i
    want = logits[0, row].log_softmax(-1)[cont[0]].item()
    assert ll == pytest.approx(want, abs=1e-4)


def test_loglikelihood_does_not_depend_on_order_or_split(lm):
    """The MC draws of a request depend on the request only: the same requests in another order,
    or split over two calls (two ranks), give identical estimates."""
    ctx = lm._prompt_ids("how many apples")
    conts = [lm.tok_encode(t) for t in ("are there now", "apples are there", "how many are")]
    reqs = [(("", ""), ctx, c) for c in conts]
    forward = lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    backward = lm._loglikelihood_tokens(reqs[::-1], disable_tqdm=True)[::-1]
    split = lm._loglikelihood_tokens(reqs[2:], disable_tqdm=True) + lm._loglikelihood_tokens(
        reqs[:2], disable_tqdm=True
    )
    assert forward == backward == split[1:] + split[:1]
    assert len({ll for ll, _ in forward}) == 3


def test_loglikelihood_prefers_the_answer_the_model_learned():
    """The tiny world's teacher was trained on these problems: for every held-out question its
    answer scores higher than the same answer tokens shuffled."""
    from d2f.lmeval.lm import D2FLM
    from d2f.tinyworld.pretrain import ASSETS
    from d2f.tinyworld.task import records

    lm = D2FLM(pretrained=str(ASSETS / "teacher"), block_size=8, max_new_tokens=24, mc_samples=8)
    rng = random.Random(0)
    for rec in records("add2", "test", 4):
        chat = lm.apply_chat_template([{"role": "user", "content": rec["question"]}])
        ctx, answer = lm._encode_pair(chat, rec["answer"])
        shuffled = answer[:]
        while shuffled == answer:
            rng.shuffle(shuffled)
        (right, _), (wrong, _) = lm._loglikelihood_tokens(
            [(("", ""), ctx, answer), (("", ""), ctx, shuffled)], disable_tqdm=True
        )
        assert right > wrong + 1.0, (rec["answer"], right, wrong)


def test_rolling_loglikelihood_raises(lm):
    with pytest.raises(NotImplementedError, match="loglikelihood_rolling"):
        lm.loglikelihood_rolling([])


def test_local_gsm8k_task_scores_like_gsm8k():
    """Our local task uses lm-eval's gsm8k prompt, stop strings, filters and metric settings."""
    import lm_eval.tasks as t
    import yaml
    from lm_eval.tasks import TaskManager

    from d2f.eval import tasks_dir

    tm = TaskManager(include_path=str(tasks_dir()), include_defaults=False)
    ours = tm.load(["d2f_gsm8k_local"])["tasks"]["d2f_gsm8k_local"].config
    ref = yaml.safe_load((Path(t.__file__).parent / "gsm8k" / "gsm8k.yaml").read_text())
    assert ours.filter_list == ref["filter_list"]
    assert ours.metric_list == ref["metric_list"]
    assert ours.doc_to_text == ref["doc_to_text"]
    assert ours.generation_kwargs["until"] == ref["generation_kwargs"]["until"]


def test_lm_refuses_flex_attention_before_loading(tmp_path):
    from d2f.lmeval.lm import D2FLM

    with pytest.raises(ValueError, match="attn_implementation='flex_attention' is not supported"):
        D2FLM(pretrained=str(tmp_path / "nothing-here"), attn_implementation="flex_attention")
