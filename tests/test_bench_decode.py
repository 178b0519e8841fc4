"""scripts/bench_decode.py runs end to end on the miniature world's held-out questions, and its
batch columns say what they claim (the same prompts at every batch size)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(*args: str) -> list[list[str]]:
    """Run the benchmark; its table rows as lists of fields."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts/bench_decode.py"), "--repeats", "1", *args],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("---")) + 1
    return [line.split() for line in lines[start:] if line.strip()]


def test_every_batch_size_decodes_the_same_prompts():
    rows = bench(
        "--model", str(ROOT / "d2f/tinyworld/assets/chain/teacher"), "--world", "chain",
        "--strategies", "d2f", "vanilla", "--batch_sizes", "1", "3", "--n", "3",
        "--max_new_tokens", "16",
    )  # fmt: skip
    assert [(r[0], r[2]) for r in rows] == [
        ("d2f", "1"), ("d2f", "3"), ("vanilla", "1"), ("vanilla", "3")
    ]  # fmt: skip
    for r in rows:
        assert r[-1] == "yes"  # batched tokens == one prompt at a time
        assert float(r[-2]) > 0  # x b1
    for first, batched in (rows[0:2], rows[2:4]):
        assert first[-2] == "1.00"
        assert first[3] == batched[3] and first[4] == batched[4]  # forwards per row, TPF
