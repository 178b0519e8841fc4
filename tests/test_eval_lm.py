"""The lm-eval model `d2f` and the `python -m d2f.eval` launcher, on tiny models and local tasks."""

import glob
import json
import os
import subprocess
import sys

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
    return {s["doc_id"]: s for s in map(json.loads, open(path))}


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
    results = json.load(open(results_path))["results"]["d2f_gsm8k_local"]
    assert "exact_match,strict-match" in results and "exact_match,flexible-extract" in results
    samples = _samples(out)
    speed = json.load(open(out / "d2f_speed.json"))
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
    speed = json.load(open(out / "d2f_speed.json"))
    assert speed["world_size"] == 2 and [
        r["tasks"]["d2f_gsm8k_local"]["samples"] for r in speed["ranks"]
    ] == [4, 4]


@pytest.mark.parametrize(
    "args,match",
    [
        (["--tasks", "no_such_task"], "no_such_task"),
        (["--model_args", "pretrained=/nonexistent/m,strategy=beam"], "strategy must be one of"),
        (["--model_args", "pretrained=/nonexistent/m,adapter=/nonexistent/adapter"], "adapter"),
    ],
)
def test_bad_input_fails_before_model_load(args, match, tmp_path):
    base = [
        "--model",
        "d2f",
        "--model_args",
        "pretrained=/nonexistent/m",
        "--tasks",
        "d2f_gsm8k_local",
    ]
    for flag in ("--tasks", "--model_args"):
        if flag in args:
            i = base.index(flag)
            base[i + 1] = args[args.index(flag) + 1]
    proc = _run([sys.executable, "-m", "d2f.eval", *base])
    assert proc.returncode != 0
    assert match in proc.stderr + proc.stdout
    assert "/nonexistent/m: no such directory" not in proc.stderr  # failed before loading the model


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


def test_prompt_gets_exactly_one_bos(lm):
    bos = lm.tokenizer.bos_token_id
    plain = lm._prompt_ids("how many apples ?")
    chat = lm._prompt_ids(
        lm.apply_chat_template([{"role": "user", "content": "how many apples ?"}])
    )
    assert plain[0] == bos and plain[1] != bos
    assert chat[0] == bos and chat[1] != bos


def test_loglikelihood_single_token_is_exact(lm):
    """With a 1-token continuation the MC estimate has k = 1 always: it equals log p(token) at the
    masked position, computed here by hand from one forward."""
    ctx, cont = lm.tok_encode("how many apples"), lm.tok_encode("are")
    ((ll, _),) = lm._loglikelihood_tokens([(("", ""), ctx, cont)], disable_tqdm=True)
    mask = lm.family.mask_token_id
    ids = torch.tensor([ctx + [mask]])
    with torch.no_grad():
        logits = lm.model(
            input_ids=ids,
            attention_mask=to_additive(torch.ones(1, len(ctx) + 1, len(ctx) + 1, dtype=torch.bool)),
        ).logits
    want = logits[0, -1].log_softmax(-1)[cont[0]].item()
    assert ll == pytest.approx(want, abs=1e-4)


def test_loglikelihood_is_deterministic_and_prefers_likely_text(lm):
    ctx = lm.tok_encode("how many apples")
    a = lm._loglikelihood_tokens(
        [(("", ""), ctx, lm.tok_encode("are there now"))], disable_tqdm=True
    )
    b = lm._loglikelihood_tokens(
        [(("", ""), ctx, lm.tok_encode("are there now"))], disable_tqdm=True
    )
    assert a == b and a[0][0] < 0


def test_rolling_loglikelihood_raises(lm):
    with pytest.raises(NotImplementedError, match="loglikelihood_rolling"):
        lm.loglikelihood_rolling([])


def test_local_gsm8k_task_scores_like_gsm8k():
    """Our local task uses lm-eval's gsm8k prompt, stop strings, filters and metric settings."""
    from lm_eval.tasks import TaskManager, get_task_dict

    from d2f.eval import tasks_dir

    tm = TaskManager(include_path=str(tasks_dir()))
    ours = get_task_dict(["d2f_gsm8k_local"], tm)["d2f_gsm8k_local"].config
    import lm_eval.tasks as t
    import yaml

    path = os.path.join(os.path.dirname(t.__file__), "gsm8k", "gsm8k.yaml")
    ref = yaml.safe_load(open(path))
    assert ours.filter_list == ref["filter_list"]
    assert ours.metric_list == ref["metric_list"]
    assert ours.doc_to_text == ref["doc_to_text"]
    assert ours.generation_kwargs["until"] == ref["generation_kwargs"]["until"]
