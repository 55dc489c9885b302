"""Training metrics to the console, to TensorBoard event files, and to ``metrics.jsonl``.

``metrics.jsonl`` (in the run directory) holds one JSON object per logged step with every
value at full precision (JSON floats round-trip exactly): the record to compare runs by,
or to plot without TensorBoard. A resumed run appends to it, so a step trained twice (after
a crash) appears twice; the later line is the one the run kept. Each validation is a line
of its own, ``{"step", "val_loss", "val_ppl", "val_tokens", "val_seconds"}`` (no ``loss``),
with ``"val_sources"`` ({source: loss}) for a mixture; a logged step of a mixture carries
``"epochs"`` ({source: epochs drawn so far}).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from opt.run.logbook.events import DownstreamEval
from opt.train.evaluate import Evaluation, perplexity


class MetricsLogger:
    """Accumulates step results between log lines and writes one line/event set per interval."""

    def __init__(
        self,
        tensorboard_dir: Path | None,
        flops_per_token: float,
        peak_flops: float,
        jsonl: Path | None = None,
    ):
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.jsonl = open(jsonl, "a") if jsonl is not None else None  # noqa: SIM115
        self.writer = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(tensorboard_dir))
        self._reset()

    def _reset(self) -> None:
        self.tokens = 0
        self.seconds = 0.0
        self.mark = time.perf_counter()

    def pause(self) -> None:
        """Stop the throughput clock (checkpoint saves do not count as training time)."""
        self.seconds += time.perf_counter() - self.mark

    def resume(self) -> None:
        self.mark = time.perf_counter()

    def log(
        self, step: int, tokens: int, values: dict[str, float],
        epochs: dict[str, float] | None = None,
    ) -> dict[str, float]:  # fmt: skip
        """Record ``tokens`` processed since the last call; emit the interval's rates, and
        each data source's epochs so far (TensorBoard ``data/epochs/<source>``)."""
        self.pause()
        self.tokens += tokens
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        values = {**values, "tokens_per_s": rate}
        if self.peak_flops > 0:
            values["mfu"] = rate * self.flops_per_token / self.peak_flops
        print(format_line(step, values), flush=True)
        if self.jsonl is not None:
            extra = {"epochs": epochs} if epochs else {}
            self.jsonl.write(json.dumps({"step": step, **values, **extra}) + "\n")
            self.jsonl.flush()
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"train/{key}", value, step)
            for source, value in (epochs or {}).items():
                self.writer.add_scalar(f"data/epochs/{source}", value, step)
            self.writer.flush()
        self._reset()
        return values

    def log_validation(self, evaluation: Evaluation) -> None:
        """One evaluation to the console, metrics.jsonl and TensorBoard (valid/loss,
        valid/ppl). Its time is not training time: it is taken out of the throughput clock."""
        self.mark += evaluation.seconds
        step, loss, ppl = evaluation.step, evaluation.loss, evaluation.ppl
        each = "".join(f" | {name} {value:.4f}" for name, value in evaluation.sources.items())
        print(
            f"step {step:>7d} | val_loss {loss:.4f} | val_ppl {ppl:.2f}{each} | "
            f"{evaluation.tokens:,} tokens in {evaluation.seconds:.2f} s",
            flush=True,
        )
        if self.jsonl is not None:
            record = {"step": step, "val_loss": loss, "val_ppl": ppl,
                      "val_tokens": evaluation.tokens, "val_seconds": evaluation.seconds}  # fmt: skip
            if evaluation.sources:
                record["val_sources"] = evaluation.sources
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.writer is not None:
            self.writer.add_scalar("valid/loss", loss, step)
            self.writer.add_scalar("valid/ppl", ppl, step)
            for name, value in evaluation.sources.items():  # a mixture's sources
                self.writer.add_scalar(f"valid/{name}/loss", value, step)
                self.writer.add_scalar(f"valid/{name}/ppl", perplexity(value), step)
            self.writer.flush()

    def log_downstream(self, event: DownstreamEval) -> None:
        """One downstream evaluation to the console and TensorBoard
        (``downstream/<task>/{median,iqr,min,max}_acc``: accuracy over the prompts). Its time
        is not training time. Not in metrics.jsonl: the logbook holds it."""
        self.mark += event.seconds
        tasks = " | ".join(
            f"{name} {t.median:.3f} (IQR {t.iqr:.3f})" for name, t in event.tasks.items()
        )
        print(f"step {event.step:>7d} | downstream median acc | {tasks} | "
              f"{event.seconds:.2f} s", flush=True)  # fmt: skip
        if self.writer is not None:
            for name, t in event.tasks.items():
                for stat in ("median", "iqr", "min", "max"):
                    self.writer.add_scalar(f"downstream/{name}/{stat}_acc", getattr(t, stat),
                                           event.step)  # fmt: skip
            self.writer.flush()

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.writer is not None:
            self.writer.close()


def format_line(step: int, values: dict[str, float]) -> str:
    parts = [f"step {step:>7d}"]
    formats = {
        "loss": "loss {:.4f}",
        "grad_norm": "grad_norm {:.3f}",
        "lr": "lr {:.3e}",
        "loss_scale": "scale {:g}",
        "tokens_per_s": "{:,.0f} tok/s",
        "mfu": "MFU {:.1%}",
    }
    for key, fmt in formats.items():
        if key in values:
            parts.append(fmt.format(values[key]))
    return " | ".join(parts)
