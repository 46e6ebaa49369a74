"""Where a run stands: the `RunState` a checkpoint records, and the rule every periodic action
(logging, validation, checkpoints) follows."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class RunState:
    """The progress of a run, saved in every checkpoint's state.json under these keys."""

    step: int = 0
    """Optimizer steps done."""
    tokens_seen: int = 0
    """Training tokens consumed by those steps, all processes together."""
    val_loss: float | None = None
    """The latest validation loss (nats/token); None before the first validation."""
    best_val_loss: float | None = None
    """The lowest validation loss so far (nats/token)."""
    wandb_id: str | None = None
    """The W&B run id, so a resumed run logs into the same W&B run."""

    def state_dict(self) -> dict:
        """The fields as a dict, in declaration order (the first keys of state.json)."""
        return dataclasses.asdict(self)

    def load_state_dict(self, saved: dict) -> None:
        """Take each field from a checkpoint's state.json (extra keys are ignored; a missing
        one keeps its current value)."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, saved.get(f.name, getattr(self, f.name)))

    def advance(self, tokens: int) -> None:
        """Count one optimizer step of `tokens` tokens."""
        self.step, self.tokens_seen = self.step + 1, self.tokens_seen + tokens

    def record_val(self, loss: float) -> None:
        """Note a validation loss (nats/token) and keep the best."""
        best = self.best_val_loss
        self.val_loss, self.best_val_loss = loss, loss if best is None else min(best, loss)


def every(step: int, interval: int, last: int) -> bool:
    """Whether a periodic action runs after `step` steps: at multiples of interval (0 = never)
    and at the last step."""
    return step == last or (interval > 0 and step % interval == 0)
