"""create_loss: pick a loss by name and bind its hyperparameters; unknown names or options list the valid ones."""

from __future__ import annotations

import functools
import inspect
from typing import Callable

from rlhf_time.loss.errors import LossConfigError, check_choice
from rlhf_time.loss.functions import (DPO_LOSS_TYPES, KD_KINDS, dpo_loss, kd_loss, pairwise_loss, policy_loss,
                                      sft_loss, value_loss)
from rlhf_time.loss.kto import KTO_LOSS_TYPES, kto_loss
from rlhf_time.loss.reduction import REDUCTIONS
from rlhf_time.loss.reference_free import orpo_odds_ratio_loss, simpo_loss

LOSSES: dict[str, Callable] = {
    "sft": sft_loss,
    "pairwise": pairwise_loss,
    "dpo": dpo_loss,
    "policy": policy_loss,
    "value": value_loss,
    "kd": kd_loss,
    "orpo": orpo_odds_ratio_loss,
    "simpo": simpo_loss,
    "kto": kto_loss,
}
# Hyperparameter names that differ from the function's keyword (the public contract says `margin`).
_RENAMED = {"pairwise": {"margin": "default_margin"}}
# Options with a fixed set of values, checked when the loss is created rather than at its first call.
_CHOICES = {"reduction": REDUCTIONS, "loss_type": DPO_LOSS_TYPES, "kind": KD_KINDS}
_LOSS_CHOICES = {"kto": {"loss_type": KTO_LOSS_TYPES}}  # a loss whose option of that name has other values


def hyperparameters(name: str) -> list[str]:
    """The keyword options create_loss accepts for a loss."""
    renamed = {v: k for k, v in _RENAMED.get(name, {}).items()}
    signature = inspect.signature(LOSSES[name])
    return [renamed.get(p.name, p.name) for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY]


def create_loss(name: str, **options) -> Callable:
    """A loss callable with its hyperparameters bound, e.g. create_loss("sft", label_smoothing=0.1)."""
    if name not in LOSSES:
        raise LossConfigError(f"unknown loss {name!r}; valid: {', '.join(LOSSES)}")
    valid = hyperparameters(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise LossConfigError(f"unknown hyperparameter(s) {unknown} for loss {name!r}; valid: {', '.join(valid)}")
    choices = {**_CHOICES, **_LOSS_CHOICES.get(name, {})}
    for option, value in options.items():
        if option in choices:
            check_choice(option, value, choices[option])
    renames = _RENAMED.get(name, {})
    return functools.partial(LOSSES[name], **{renames.get(k, k): v for k, v in options.items()})
