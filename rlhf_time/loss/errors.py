"""The error the loss library raises for a bad name, option or value."""

from rlhf_time.errors import RlhfTimeError


class LossConfigError(RlhfTimeError, ValueError):
    """Unknown loss name, hyperparameter or choice; the message lists the valid ones."""


def check_choice(option: str, value: str, valid: tuple[str, ...]) -> None:
    """Raise LossConfigError unless `value` is one of `valid`."""
    if value not in valid:
        raise LossConfigError(f"{option}={value!r}; valid: {', '.join(valid)}")
