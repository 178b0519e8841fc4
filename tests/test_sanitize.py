"""The code sanitiser on realistic messy completions: literal expected programs, and the programs run."""

from d2f.lmeval.sanitize import extract_fenced, sanitize

# A HumanEval-style prompt: an import, a helper, then the signature and docstring of the entry point.
PROMPT = '''from typing import List


def is_even(n: int) -> bool:
    return n % 2 == 0


def count_even(numbers: List[int]) -> int:
    """Count the even numbers.
    >>> count_even([1, 2, 4])
    2
    """
'''


def run(program: str, entry_point: str):
    """The entry point defined by `program` (executing it must not raise)."""
    namespace: dict = {}
    exec(program, namespace)
    return namespace[entry_point]


def test_prose_then_python_fence_then_usage():
    completion = (
        "Sure! Here is a function that adds two numbers:\n\n"
        "```python\n"
        "def add(a, b):\n"
        "    return a + b\n"
        "\n"
        "# Example usage\n"
        "print(add(2, 3))\n"
        "assert add(1, 1) == 2\n"
        "```\n\n"
        "The function returns the sum of its arguments."
    )
    assert sanitize(completion, "add") == "def add(a, b):\n    return a + b"


def test_fence_without_language_tag_and_main_guard():
    completion = (
        "```\n"
        "import math\n"
        "\n"
        "def root(x):\n"
        "    return math.sqrt(x)\n"
        "\n"
        'if __name__ == "__main__":\n'
        "    print(root(4))\n"
        "```"
    )
    assert sanitize(completion, "root") == "import math\n\ndef root(x):\n    return math.sqrt(x)"


def test_first_python_block_after_other_fences():
    completion = "Input:\n```text\n1 2\n```\nCode:\n```py\ndef f():\n    return 1\n```\n```python\ndef g():\n    pass\n```"
    assert extract_fenced(completion) == "def f():\n    return 1"
    assert sanitize(completion, "f") == "def f():\n    return 1"


def test_used_helpers_kept_transitively_unused_dropped():
    completion = (
        "```python\n"
        "import re\n"
        "SCALE = 10\n"
        "\n"
        "def unused(x):\n"
        "    return x\n"
        "\n"
        "def inner(x):\n"
        "    return x * SCALE\n"
        "\n"
        "def helper(x):\n"
        "    return inner(x) + 1\n"
        "\n"
        "def solve(x):\n"
        "    return helper(x)\n"
        "\n"
        "result = solve(3)\n"
        "print(result)\n"
        "```"
    )
    expected = (
        "import re\n\nSCALE = 10\n\n"
        "def inner(x):\n    return x * SCALE\n\n"
        "def helper(x):\n    return inner(x) + 1\n\n"
        "def solve(x):\n    return helper(x)"
    )
    assert sanitize(completion, "solve") == expected
    assert run(expected, "solve")(3) == 31


def test_no_entry_point_keeps_every_def():
    completion = "def a():\n    return 1\n\ndef b():\n    return 2\n\nprint(a(), b())"
    assert sanitize(completion) == "def a():\n    return 1\n\ndef b():\n    return 2"


def test_body_only_completion_continues_the_prompt():
    completion = (
        "    return sum(1 for x in numbers if is_even(x))\n"
        "\n\n"
        "print(count_even([1, 2, 3, 4]))\n"
        "```\n"
        "This counts the even numbers using the helper."
    )
    program = sanitize(completion, "count_even", PROMPT)
    assert program.startswith("from typing import List\n\ndef is_even(n: int) -> bool:")
    assert program.endswith('    """\n    return sum(1 for x in numbers if is_even(x))')
    assert "print" not in program and "```" not in program
    assert run(program, "count_even")([1, 2, 4, 6, 7]) == 3


def test_full_function_after_prompt_keeps_prompt_imports_and_helpers():
    completion = (
        "Here is the implementation:\n\n"
        "```python\n"
        "def count_even(numbers: List[int]) -> int:\n"
        "    return len([x for x in numbers if is_even(x)])\n"
        "```"
    )
    program = sanitize(completion, "count_even", PROMPT)
    assert program == (
        "from typing import List\n\n"
        "def is_even(n: int) -> bool:\n    return n % 2 == 0\n\n"
        "def count_even(numbers: List[int]) -> int:\n"
        "    return len([x for x in numbers if is_even(x)])"
    )  # the prompt's stub of count_even is shadowed by the model's and dropped
    assert run(program, "count_even")([2, 3, 4]) == 2


def test_truncated_last_line_dropped():
    completion = (
        "def add(a, b):\n"
        "    return a + b\n"
        "\n"
        "def mul(a, b):\n"
        "    return a * (b +"  # the generation hit its cap mid-expression
    )
    assert sanitize(completion, "add") == "def add(a, b):\n    return a + b"


def test_unclosed_fence_runs_to_the_end():
    completion = "```python\ndef add(a, b):\n    return a + b\n\nprint(add(1,"
    assert sanitize(completion, "add") == "def add(a, b):\n    return a + b"


def test_truncated_body_completion():
    completion = "    total = 0\n    for x in numbers:\n        total += is_even(x)\n    return tot"
    program = sanitize(completion, "count_even", PROMPT)
    # `return tot` parses (a NameError at run time, not a syntax error): kept, the test fails later
    assert program.endswith("    return tot")
    completion = "    total = 0\n    for x in numbers:\n        total += is_even(x"
    program = sanitize(completion, "count_even", PROMPT)
    assert program.endswith("    total = 0")  # the unfinished `for` is dropped


def test_no_code_fails_cleanly():
    assert sanitize("I am sorry, I cannot help with that.", "add") == ""
    assert sanitize("", "add") == ""
    # With a prompt: the prompt's own definitions, whose stub returns None and fails the tests.
    program = sanitize("I am sorry, I cannot help with that.", "count_even", PROMPT)
    assert run(program, "count_even")([2]) is None
