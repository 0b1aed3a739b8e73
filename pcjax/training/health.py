"""Loss-spike detection: running statistics of recent healthy steps, and where a spike began.

A step is anomalous when its loss or state is not finite, or when its loss, gradient norm or
parameter norm exceeds `factor` times the median of that quantity over the last `window`
healthy steps. The loss median is floored at a tenth of the chance-level loss and the gradient
norm's at a hundredth of the parameter norm's, so that batch noise near zero loss (where the
gradients vanish) is not a spike. A spike that lasts `patience` consecutive steps, a
non-finite step, or a spike still open when the run ends is a divergence. A spike that ends
sooner is logged and forgotten.

Step s's loss and gradient are those of the weights saved at step s - 1, its parameter norm
that of the weights saved at step s. So a spike found at step s taints the checkpoints of steps
>= s - 1; and because a slow blow-up crosses the threshold late, the spike is dated back to
the step after the last one whose loss was at or below the healthy median.

The monitor's state is a small JSON dict, saved in every checkpoint, so a resumed run keeps
its statistics.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

QUANTITIES = ("loss", "grad_norm", "param_norm")


@dataclasses.dataclass
class Verdict:
    """The outcome of one step: `diverged` with the step the spike began and why."""

    diverged: bool = False
    onset: int | None = None
    reason: str = ""


class SpikeMonitor:
    """Watches per-step metrics on the host; `observe` each step in order."""

    def __init__(
        self,
        window: int,
        factor: float,
        patience: int,
        num_classes: int,
        min_history: int = 10,
        state: dict[str, Any] | None = None,
    ):
        self.window, self.factor, self.patience = window, factor, patience
        self.min_history = min(min_history, window)
        self.loss_floor = 0.1 * math.log(max(num_classes, 2))
        state = state or {}
        # Healthy steps, oldest first: [step, loss, grad_norm, param_norm].
        self.history: list[list[float]] = [list(h) for h in state.get("history", [])]
        self.spike: dict[str, Any] | None = state.get("spike")
        self.peak: float = float(state.get("peak", 0.0))  # largest ratio seen while healthy

    def state(self) -> dict[str, Any]:
        """JSON-serialisable state, saved with each checkpoint."""
        return {"history": self.history, "spike": self.spike, "peak": self.peak}

    @property
    def open_spike(self) -> bool:
        return self.spike is not None

    def medians(self) -> dict[str, float]:
        """Median of each quantity over the healthy window (loss floored)."""
        out = {}
        for i, name in enumerate(QUANTITIES, start=1):
            values = sorted(h[i] for h in self.history)
            mid = len(values) // 2
            out[name] = values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])
        out["loss"] = max(out["loss"], self.loss_floor)
        out["grad_norm"] = max(out["grad_norm"], 0.01 * out["param_norm"])
        return out

    def ratios(self, metrics: dict[str, float]) -> dict[str, float]:
        """Each quantity over its healthy median; empty while the history is too short."""
        if len(self.history) < self.min_history:
            return {}
        medians = self.medians()
        return {k: float(metrics[k]) / medians[k] if medians[k] > 0 else 0.0 for k in QUANTITIES}

    def observe(self, step: int, metrics: dict[str, float]) -> Verdict:
        """Updates the statistics with step `step`; says whether the run diverged."""
        values = [float(metrics[k]) for k in QUANTITIES]
        finite = bool(metrics.get("finite", 1.0)) and all(math.isfinite(v) for v in values)
        if not finite:
            onset = self.spike["onset"] if self.spike else step
            return Verdict(True, onset, f"non-finite loss or parameters after step {step}")
        ratios = self.ratios(metrics)
        worst = max(ratios, key=ratios.get) if ratios else None
        if worst is None or ratios[worst] <= self.factor:
            self._healthy(step, values, ratios)
            return Verdict()
        if self.spike is None:
            self.spike = {"onset": self._onset(step), "count": 0, "first": step}
        self.spike["count"] += 1
        med = self.medians()[worst]
        self.spike["reason"] = (
            f"{worst} {values[QUANTITIES.index(worst)]:.3g} at step {step}, "
            f"{ratios[worst]:.3g} x its running median {med:.3g}"
        )
        if self.spike["count"] >= self.patience:
            return self.confirm()
        return Verdict()

    def confirm(self) -> Verdict:
        """The open spike, if any, as a divergence (used too when the run ends inside one)."""
        if self.spike is None:
            return Verdict()
        return Verdict(True, int(self.spike["onset"]), "loss spike: " + self.spike["reason"])

    def _healthy(self, step: int, values: list[float], ratios: dict[str, float]) -> None:
        self.spike = None  # a spike that ended before `patience` steps was noise
        if ratios:
            self.peak = max(self.peak, *ratios.values())
        self.history.append([step, *values])
        del self.history[: -self.window]

    def _onset(self, step: int) -> int:
        """The step after the last healthy one whose loss was at or below the median."""
        median = self.medians()["loss"]
        for h in reversed(self.history):
            if h[1] <= median:
                return int(h[0]) + 1
        return int(self.history[0][0]) if self.history else step


def tainted_steps(saved: list[int], onset: int) -> list[int]:
    """Checkpoints written with weights of a spike that began at step `onset`."""
    return sorted(s for s in saved if s >= onset - 1)
