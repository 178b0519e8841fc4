"""The miniature world's synthetic task and tokenizer."""

import re

import pytest

from d2f.tinyworld.task import LEVELS, problems, records, split_operands
from d2f.tinyworld.tokenizer import train_tokenizer

# the first edition's levels (operand lists); `chain` is tested in tests/test_tinyworld_chain.py
FIRST = [level for level in LEVELS if level != "chain"]


@pytest.mark.parametrize("level", FIRST)
def test_answers_are_right_and_in_gsm8k_format(level):
    for p in problems(level, "train", n=200, seed=1):
        nums = [int(x) for x in re.findall(r"\d+", p.question)]
        want = nums[0] + nums[1] - (nums[2] if level == "multi" else 0)
        assert p.result == want
        assert re.search(r"#### (\-?[0-9\.\,]+)", p.answer).group(1) == str(want)
        assert p.answer.endswith(f"#### {want}")


@pytest.mark.parametrize("level", FIRST)
def test_held_out_operands_never_in_training(level):
    ops = split_operands(level, seed=3)
    assert ops["test"] and not set(ops["test"]) & set(ops["train"])
    held = set(ops["test"])
    for p in problems(level, "train", n=3000, seed=3):
        nums = tuple(int(x) for x in re.findall(r"\d+", p.question))
        assert nums not in held


def test_deterministic_by_seed_and_levels_differ():
    assert records("add2", "train", 50, seed=5) == records("add2", "train", 50, seed=5)
    assert records("add2", "train", 50, seed=5) != records("add2", "train", 50, seed=6)
    assert records("add2", "test", seed=0) == records("add2", "test", seed=0)
    one = problems("add1", "test")
    assert all(max(map(int, re.findall(r"\d+", p.question))) <= 9 for p in one)
    with pytest.raises(ValueError, match="unknown level"):
        records("add3", "test")
    with pytest.raises(ValueError, match="give n"):
        records("add2", "train")


def test_tokenizer_digits_and_roundtrip():
    recs = records("add2", "train", 2000)
    tok = train_tokenizer(r["question"] + " " + r["answer"] for r in recs)
    assert len(tok) < 80
    text = records("add2", "test", 1)[0]["answer"]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text  # numbers come back without spaces: "#### 145"
    assert tok.convert_ids_to_tokens(tok("####", add_special_tokens=False)["input_ids"]) == ["####"]
    digits = {t for t in tok.get_vocab() if t.lstrip("~").isdigit()}
    assert all(len(t.lstrip("~")) == 1 for t in digits)  # every number is spelled with digits
    for special in ("<|mdm_mask|>", "<|eot_id|>", "<|start_header_id|>", "<|endoftext|>"):
        assert special in tok.get_vocab()
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False
    )
    assert chat.startswith("<|startoftext|><|start_header_id|>user")


def _docs(metadata: dict) -> list[dict]:
    from lm_eval.tasks import TaskManager

    from d2f.eval import tasks_dir

    tm = TaskManager(include_path=str(tasks_dir()), include_defaults=False, metadata=metadata)
    return list(tm.load(["d2f_tiny_add"])["tasks"]["d2f_tiny_add"].test_docs())


def test_lm_eval_task_over_held_out_split():
    assert _docs({"n": 20}) == records("add2", "test", 20)
    assert _docs({"n": 20, "world_seed": 3}) == records("add2", "test", 20, seed=3)


def test_model_args_do_not_reach_the_task_data(monkeypatch):
    """lm-eval's CLI merges the model args into the task metadata: the model's Monte-Carlo `seed`
    (or any other model arg) must not change which problems the held-out split holds."""
    import importlib.util

    from lm_eval._cli import HarnessCLI
    from lm_eval.config.evaluate_config import EvaluatorConfig

    from d2f.eval import tasks_dir

    argv = ["--model", "d2f", "--model_args", "pretrained=x,seed=7,block_size=8", "--tasks", "t"]
    monkeypatch.setattr("sys.argv", ["lm-eval", *argv, "--metadata", '{"n": 50}'])
    metadata = EvaluatorConfig.from_cli(HarnessCLI().parse_args()).metadata
    assert metadata["seed"] == 7  # what lm-eval hands to the loader
    held_out = records("add2", "test", 50)
    assert _docs(metadata) == held_out
    # the loader's own options are named so that no model arg can collide with them
    from d2f.lmeval.lm import known_model_args

    spec = importlib.util.spec_from_file_location("tiny_utils", tasks_dir() / "tiny_utils.py")
    tiny_utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny_utils)
    assert not set(tiny_utils.OPTIONS) & set(known_model_args())
