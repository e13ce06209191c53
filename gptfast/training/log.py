"""What a training run reports: lines on the console (through the progress bar when there
is one), one JSON row per log or evaluation step in ``<out>/metrics.jsonl``, and the
training throughput (tokens/s over training time only, evaluations and checkpoints not
counted). Only rank 0 writes; the other ranks' calls do nothing.
"""
import contextlib
import json
import time
from pathlib import Path
from typing import Optional

from gptfast.runtime.atomic_files import write_atomically

METRICS_NAME = "metrics.jsonl"


class TrainLog:
    def __init__(self, out_dir, enabled: bool):
        self.metrics_path = Path(out_dir) / METRICS_NAME
        self.enabled = enabled  # rank 0
        self.bar = None  # the tqdm progress bar, while open

    def open_bar(self, total: int, initial: int) -> None:
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def compiling(self) -> None:
        """Before the first step of a ``compile`` run: say that it compiles (it takes a while)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description_str("compiling…")
            self.bar.refresh()
        else:
            self.message("compiling the training step (torch.compile)…")

    def compiled(self, seconds: float) -> None:
        """After that first step: its time, compile included."""
        if self.bar is not None:
            self.bar.set_description_str("train", refresh=False)
        self.message(f"compiled: the first step took {seconds:.1f} s (compile included; tokens/s counts from the next)")

    def step(self, step: int, max_steps: int, record: Optional[dict]) -> None:
        """After an optimizer step: advance the bar; ``record`` (at log and evaluation steps)
        goes to metrics.jsonl and, at log steps, to the bar or one console line."""
        if not self.enabled:
            return
        if record is not None:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        logged = record is not None and record["tokens_per_s"] is not None
        if self.bar is not None:
            self.bar.update(1)
            if logged:
                self.bar.set_postfix_str(step_summary(record), refresh=False)
        elif logged:  # no progress bar (e.g. torchrun logs): one line per log step
            self.message(f"step {step}/{max_steps}: {step_summary(record)}")

    def restart(self) -> None:
        """A fresh run in this directory: forget the old metrics."""
        if self.enabled:
            self.metrics_path.unlink(missing_ok=True)

    def rewind(self, step: int) -> None:
        """A run resumed from its checkpoint at ``step``: drop the rows of later steps (the
        run will log them again) and any row torn by a kill mid-write."""
        if not self.enabled or not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                kept.append(line + "\n")
        write_atomically(self.metrics_path, lambda f: f.write("".join(kept).encode()))


def step_summary(record: dict) -> str:
    parts = [f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}", f"{record['tokens_per_s']:,.0f} tok/s"]
    parts.append(f"MFU {100 * record['mfu']:.1f}%" if record["mfu"] is not None else "MFU n/a")
    return ", ".join(parts)


class Throughput:
    """Tokens per second of training time: :meth:`paused` brackets what is not training."""

    def __init__(self):
        self.start = time.perf_counter()
        self.tokens = 0

    def restart(self) -> None:
        self.start, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    @contextlib.contextmanager
    def paused(self):
        began = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - began

    def take(self) -> float:
        """Tokens/s since the last take (or the start); starts the next interval."""
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        self.restart()
        return rate
