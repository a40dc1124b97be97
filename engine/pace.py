"""The pace of a fine-tune: the time left, from its recent steps (``engine.finetune.run`` reports it as ``eta_s``),
and how often ``studio finetune`` prints it (``progress_printer``).

The average over the whole run so far was off both ways: the first step warms up (kernels, caches, the allocator)
and made the first estimates high, and the evaluations and checkpoints, which come every N steps, counted only
as a share of the steps already done (none before the first), which made the estimates low. Here a step's pace is
the mean of the last ``WINDOW`` steps' training time (the first step only while it is the only one), and each
evaluation and checkpoint still to come is counted at the time the last one took (before the first one: not yet
known, so not counted).
"""
from __future__ import annotations

import json
import time
from collections import deque
from typing import Callable

WINDOW = 20  # steps


def still_to_come(done: int, total: int, every: int) -> int:
    """How many of the steps done+1 .. total are multiples of ``every`` or the last step (which always evaluates and
    checkpoints)."""
    if done >= total:
        return 0
    return total // every - done // every + (1 if total % every else 0)


class Pace:
    def __init__(self, total: int, eval_every: int, checkpoint_every: int):
        self.total, self.eval_every, self.checkpoint_every = total, eval_every, checkpoint_every
        self.first = None  # seconds of the run's first step
        self.recent: deque = deque(maxlen=WINDOW)
        self.eval_s = self.checkpoint_s = 0.0  # what the last of each took

    def step(self, seconds: float) -> None:
        """A training step took ``seconds`` (without its evaluation or checkpoint)."""
        if self.first is None:
            self.first = seconds
        else:
            self.recent.append(seconds)

    def evaluated(self, seconds: float) -> None:
        self.eval_s = seconds

    def checkpointed(self, seconds: float) -> None:
        self.checkpoint_s = seconds

    def seconds_per_step(self) -> float:
        if self.recent:
            return sum(self.recent) / len(self.recent)
        return self.first or 0.0

    def eta(self, done: int) -> float:
        """Seconds left after step ``done``: the steps, evaluations and checkpoints still to come."""
        return (self.seconds_per_step() * max(0, self.total - done)
                + self.eval_s * still_to_come(done, self.total, self.eval_every)
                + self.checkpoint_s * still_to_come(done, self.total, self.checkpoint_every))


PRINT_EVERY_S = 2.0  # `studio finetune` prints a step line at most this often (with --json: every step)


def progress_printer(as_json: bool, clock: Callable[[], float] = time.monotonic) -> Callable[[dict], None]:
    """``run``'s ``report`` for the command line: with ``as_json`` every event as a JSON line on stdout; else on
    stderr a line for the first and the last step, each evaluation, and otherwise one every PRINT_EVERY_S (a line
    per step scrolled the terminal), and the messages."""
    import sys

    printed = [None]  # when the last step line was printed

    def report(e: dict) -> None:
        if as_json:
            print(json.dumps(e), flush=True)
        elif "step" in e:
            now = clock()
            if not (printed[0] is None or now - printed[0] >= PRINT_EVERY_S or e["step"] == e["total"]
                    or "val_loss" in e):
                return
            printed[0] = now
            val = f"  val {e['val_loss']:.4f}" if "val_loss" in e else ""
            print(f"step {e['step']}/{e['total']}  loss {e['loss']:.4f}{val}  {e['seconds_per_step']:.3f} s/step  "
                  f"{e['eta_s']:.0f} s left", file=sys.stderr, flush=True)
        elif "message" in e:
            print(e["message"], file=sys.stderr)
    return report
