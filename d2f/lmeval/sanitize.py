"""Code sanitiser: the program to execute for a code-generation answer (HumanEval pass@1).

The paper's HumanEval numbers turn lm-eval's stop strings off, keep the whole generation and score
pass@1 after a sanitiser (docs/upstream.md, "What the released eval scripts run",
after evalplus' `sanitize`). This is the same recipe on Python's own `ast`:

1. the code: the first fenced block (```python / ```py / ``` ... ```; an unclosed fence runs to the
   end), else the raw text;
2. the longest run of lines that parses (it starts at an unindented line): prose before and after
   the code and a truncated last line fall away;
3. keep the imports, and of the functions, classes and top-level assignments only those the entry
   point uses (transitive closure over the names they mention; no entry point: every def); drop
   top-level test code (asserts, prints, calls, `if __name__ == "__main__":`).

A completion that only continues the prompt (HumanEval as a plain completion: the prompt holds the
signature and docstring, the model writes the indented body) is sanitised as `prompt + completion`.
A completion that writes whole functions is sanitised after the prompt, so the prompt's imports and
helpers stay available and the completion's definition of the entry point wins.

    sanitize("Sure!\\n```python\\ndef add(a, b):\\n    return a + b\\n\\nprint(add(1, 2))\\n```", "add")
    -> "def add(a, b):\\n    return a + b"
"""

from __future__ import annotations

import ast
import re

_FENCE = re.compile(r"^[ \t]*```[ \t]*([A-Za-z0-9_+-]*)[ \t]*$", re.MULTILINE)
_DEF_NODES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_PYTHON_TAGS = ("", "python", "python3", "py")


def parses(code: str) -> bool:
    """Whether `code` is syntactically valid Python."""
    try:
        ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False
    return True


def extract_fenced(text: str) -> str | None:
    """The body of the first fenced Python (or untagged) block; None if the text has no fence."""
    fences = list(_FENCE.finditer(text))
    # Fences pair up in order: (open, close), (open, close), ...; a fence that is never closed
    # (the generation hit its cap) runs to the end of the text.
    for i in range(0, len(fences), 2):
        if fences[i].group(1).lower() in _PYTHON_TAGS:
            end = fences[i + 1].start() if i + 1 < len(fences) else len(text)
            return text[fences[i].end() : end].strip("\n")
    return None


def _nonblank(lines: list[str]) -> int:
    return sum(1 for line in lines if line.strip())


def longest_parsing_prefix(lines: list[str], min_end: int = 0) -> int:
    """Largest e >= min_end such that lines[:e] parses (0 if none)."""
    for end in range(len(lines), min_end - 1, -1):
        if parses("\n".join(lines[:end])):
            return end
    return 0


def longest_parsing_span(text: str) -> str:
    """The run of lines, starting at an unindented line, with the most non-blank lines that parses.

    Ties go to the earliest run. Cost: at most one parse per (start, end) pair, and a start is
    skipped as soon as it cannot beat the best run found.
    """
    lines = text.split("\n")
    best, best_span = 0, (0, 0)
    for start, line in enumerate(lines):
        if not line.strip() or line[0].isspace():
            continue
        if _nonblank(lines[start:]) <= best:
            break
        end = start + longest_parsing_prefix(lines[start:], min_end=1)
        if end > start and _nonblank(lines[start:end]) > best:
            best, best_span = _nonblank(lines[start:end]), (start, end)
    return "\n".join(lines[best_span[0] : best_span[1]])


def _defined_names(node: ast.stmt) -> list[str]:
    """Names a kept top-level statement binds (defs, classes, plain assignments)."""
    if isinstance(node, _DEF_NODES):
        return [node.name]
    targets: list[ast.expr] = []
    if isinstance(node, ast.Assign):
        targets = list(node.targets)
    elif isinstance(node, ast.AnnAssign) and node.value is not None:
        targets = [node.target]
    names: list[str] = []
    for target in targets:
        elts = target.elts if isinstance(target, ast.Tuple | ast.List) else [target]
        if not all(isinstance(e, ast.Name) for e in elts):
            return []  # `x[0] = ...`, `obj.attr = ...`: test code, not a definition
        names += [e.id for e in elts]
    return names


def _used_names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _source(lines: list[str], node: ast.stmt) -> str:
    """The statement's original text (decorators included), comments and all."""
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return "\n".join(lines[first - 1 : node.end_lineno])


def keep_used(code: str, entry_point: str | None) -> str:
    """Imports, plus the definitions reachable from `entry_point` (every def if None or absent).

    `code` must parse. Top-level statements that are neither imports nor definitions are dropped;
    of a function or class defined twice only the last definition (the one that runs) stays.
    """
    tree = ast.parse(code)
    lines = code.split("\n")
    imports = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    defs = [n for n in tree.body if _defined_names(n)]
    by_name: dict[str, list[ast.stmt]] = {}
    for node in defs:
        for name in _defined_names(node):
            by_name.setdefault(name, []).append(node)

    if entry_point in by_name:
        roots = [entry_point]
    else:
        roots = [n.name for n in defs if isinstance(n, _DEF_NODES)]
    reached: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in reached or name not in by_name:
            continue
        reached.add(name)
        for node in by_name[name]:
            todo += _used_names(node) - reached

    # A name defined twice (the prompt's stub, then the model's full function) runs as the last.
    last_def = {n.name: n for n in tree.body if isinstance(n, _DEF_NODES)}
    shadowed = [n for n in tree.body if isinstance(n, _DEF_NODES) and last_def[n.name] is not n]
    kept = [
        n
        for n in tree.body
        if n in imports or (set(_defined_names(n)) & reached and n not in shadowed)
    ]
    return "\n\n".join(_source(lines, n) for n in kept)


def continues_prompt(prompt: str, completion: str) -> bool:
    """Whether `completion` is a body under the prompt's last signature: its first non-blank line
    is indented (HumanEval as a plain completion)."""
    first = next((line for line in completion.split("\n") if line.strip()), "")
    return bool(prompt.strip()) and first[:1].isspace()


def sanitize(completion: str, entry_point: str | None = None, prompt: str = "") -> str:
    """The program to run for `completion`: see the module docstring.

    Never raises on model text: a completion with no code gives the prompt's own definitions (or
    ""), which then fails its tests cleanly.
    """
    if continues_prompt(prompt, completion):
        lines = (prompt + completion).split("\n")
        end = longest_parsing_prefix(lines)
        n_prompt = prompt.count("\n")  # lines wholly inside the prompt
        if "\n".join(lines[n_prompt:end]).strip():
            return keep_used("\n".join(lines[:end]), entry_point)
    fenced = extract_fenced(completion)
    code = longest_parsing_span(fenced if fenced is not None else completion)
    if prompt.strip() and parses(prompt):
        code = prompt.rstrip("\n") + "\n\n" + code if code else prompt
    return keep_used(code, entry_point) if parses(code) else ""
