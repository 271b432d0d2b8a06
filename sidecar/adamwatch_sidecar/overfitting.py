"""Overfitting: the validation loss rises from one evaluation to the next while the training loss falls.

:class:`OverfittingStreak` keeps, per trainer, the previous evaluation's
validation loss and the mean training loss of the steps before it. Each new
evaluation extends the streak when the validation loss rose and the mean
training loss since the previous evaluation fell; any other evaluation resets it.
The alert ``AdamwatchOverfitting`` fires when the streak reaches K (3 by default).

    >>> streak = OverfittingStreak()
    >>> for train, val in [(2.0, 1.9), (1.8, 1.8), (1.6, 1.85), (1.5, 1.9), (1.4, 2.0)]:
    ...     streak.add_train_loss(train)
    ...     n = streak.add_eval_loss(val)
    >>> n
    3
"""

from __future__ import annotations

import math

__all__ = ["OverfittingStreak", "VALIDATION_LOSS_NAMES"]

# The evaluation result taken as the validation loss, first found wins.
VALIDATION_LOSS_NAMES: tuple[str, ...] = ("loss", "val_loss", "eval_loss", "validation_loss")


class OverfittingStreak:
    """Counts consecutive evaluations with a rising validation loss and a falling training loss."""

    def __init__(self) -> None:
        self.streak = 0
        self._train_sum = 0.0
        self._train_count = 0
        self._previous_eval: float | None = None
        self._previous_train_mean: float | None = None

    def add_train_loss(self, loss: float) -> None:
        """A training step's loss (non-finite ones are ignored: the NaN alerts cover them)."""
        if math.isfinite(loss):
            self._train_sum += loss
            self._train_count += 1

    def add_eval_loss(self, loss: float | None) -> int:
        """An evaluation's validation loss; returns the streak after it."""
        train_mean = self._train_sum / self._train_count if self._train_count else None
        self._train_sum, self._train_count = 0.0, 0
        if loss is None or not math.isfinite(loss):
            self.streak = 0
            self._previous_eval = None
            self._previous_train_mean = train_mean
            return self.streak
        rising = self._previous_eval is not None and loss > self._previous_eval
        falling = (train_mean is not None and self._previous_train_mean is not None
                   and train_mean < self._previous_train_mean)
        self.streak = self.streak + 1 if rising and falling else 0
        self._previous_eval = loss
        if train_mean is not None:
            self._previous_train_mean = train_mean
        return self.streak
