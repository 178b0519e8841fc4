"""`metrics.jsonl`, wandb and the progress bar of a training run (`d2f.train`).

One record per `train.log_every` steps: loss terms (mean over processes), lr, grad norm (before
clipping), `masked_frac` over answer positions, ms/step and `tokens_per_s` (real tokens, padding
excluded). On resume the file is cut back to the checkpoint's step, atomically; a torn last line
(a kill during a write) is dropped with a warning.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import OmegaConf
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from d2f.train import Run, StepResult


class MetricsLog:
    """metrics.jsonl (main process) + wandb + the progress bar. On resume, records after the
    checkpoint are dropped; a torn last line (a kill during a write) is dropped with a warning."""

    def __init__(self, run: Run):
        self.run, acc, tc = run, run.accelerator, run.cfg.train
        self.active = acc.is_main_process
        self.path, self.wandb = run.out_dir / "metrics.jsonl", None
        self.first_steps = run.state.step + 3  # ms/step of the first steps: slow threads show early
        self.t_last, self.step_last, self.tokens = time.perf_counter(), run.state.step, 0
        self.progress = tqdm(
            total=tc.max_steps,
            initial=run.state.step,
            disable=not self.active,
            desc=f"d2f {tc.objective}",
            dynamic_ncols=True,
        )
        self.note = self.progress.write if self.active else (lambda msg: None)
        if not self.active:
            return
        run.out_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept, dropped = _records_up_to(self.path, run.state.step)
            _rewrite(self.path, kept)
            if dropped:
                acc.print(f"{self.path}: {dropped} record(s) after step {run.state.step} dropped")
        if tc.wandb:
            try:
                import wandb
            except ImportError:
                raise ImportError("train.wandb=true needs `pip install wandb`") from None
            self.wandb = wandb.init(
                project=tc.wandb_project,
                mode=tc.wandb_mode,
                dir=str(run.out_dir),
                config=OmegaConf.to_container(OmegaConf.structured(run.cfg)),
            )

    def step(self, result: StepResult) -> None:
        """Progress, and a record every train.log_every steps (and at the end)."""
        run, tc = self.run, self.run.cfg.train
        self.tokens += result.real_tokens
        if not result.taken:
            return
        step = run.state.step
        self.progress.update(1)
        due = step % tc.log_every == 0 or step == tc.max_steps
        if not (due or step <= self.first_steps):
            return
        acc = run.accelerator
        record = {k: acc.reduce(v.reshape(1), "mean").item() for k, v in result.terms.items()}
        now = time.perf_counter()
        seconds = now - self.t_last
        ms = 1000.0 * seconds / (step - self.step_last)
        answer = result.batch.blocks >= 1  # answer, end token and attended padding (G, L)
        record = {
            "step": step,
            **record,
            "lr": result.lr,
            "grad_norm": result.grad_norm,
            "masked_frac": (result.batch.masked & answer).sum().item()
            / max(1, answer.sum().item()),
            "ms_per_step": ms,
            "tokens_per_s": self.tokens / seconds,
            "skipped": run.state.skipped,
        }
        self.t_last, self.step_last, self.tokens = now, step, 0
        self.progress.set_postfix(loss=f"{record['loss']:.4f}", ms=f"{ms:.0f}")
        if step <= self.first_steps:
            self.note(f"step {step}: {ms:.0f} ms/step, loss {record['loss']:.4f}")
        if due and self.active:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if self.wandb is not None:
                self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def close(self) -> None:
        self.progress.close()
        if self.wandb is not None:
            self.wandb.finish()


def _records_up_to(path: Path, step: int) -> tuple[list[str], int]:
    """The lines of metrics.jsonl with records of steps <= `step`, and how many later records were
    dropped; a torn LAST line is dropped with a warning, a damaged earlier one is an error."""
    lines = path.read_text().splitlines()
    kept, dropped = [], 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                warnings.warn(
                    f"{path}:{number}: torn last record dropped: {line[:80]!r}", stacklevel=2
                )
                break
            raise ValueError(
                f"{path}:{number}: not a JSON record; fix or remove the line"
            ) from None
        if record["step"] <= step:
            kept.append(line)
        else:
            dropped += 1
    return kept, dropped


def _rewrite(path: Path, lines: list[str]) -> None:
    """Replace `path` atomically (a kill mid-write leaves the old file, never a truncated one)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, path)
