"""Checks of user-given values shared by the compiler and the runtime (no TVM, no torch)."""

import math
import numbers

from .errors import OptimizerError


def is_finite_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)


def check_learning_rate(lr) -> None:
    """A learning rate is a finite number >= 0 (an optimizer's and `program.lr = ...`)."""
    if not is_finite_number(lr) or lr < 0:
        raise OptimizerError(f"Invalid learning rate: {lr!r} (must be a finite number >= 0)")
