"""Checks of config values that a field's type cannot express: every number finite (nested ones too), a device
that exists on this machine, and option sections that belong to the run's stage."""

from __future__ import annotations

import math
import re
from typing import Any, Optional

from rlhf_time.config_errors import ConfigError
from rlhf_time.stages import SECTIONS, STAGES


def check_sections_belong_to_stage(data: dict[str, Any]) -> None:
    """A section for another stage than the run's would silently do nothing: refuse it."""
    stage = data.get("stage", "sft")
    if not isinstance(stage, str) or stage not in STAGES:
        return  # the stage validator names the valid stages (and refuses a stage that is not a string)
    foreign = [name for name in SECTIONS if data.get(name) is not None and name not in STAGES[stage].sections]
    if foreign:
        owners = {name: [s for s, entry in STAGES.items() if name in entry.sections] for name in foreign}
        raise ConfigError("; ".join(f"section {name!r} holds options of stage {' and '.join(owners[name])}, "
                                    f"not of this run's stage {stage!r}: remove it or set stage" for name in foreign))


def first_non_finite(value: Any, where: str = "") -> Optional[tuple[str, float]]:
    """(where, number) of the first inf/NaN float in value, lists and dicts searched (where: '[1]', "['a']")."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (where, value)
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        found = first_non_finite(item, f"{where}[{key!r}]")
        if found is not None:
            return found
    return None


DEVICE_PATTERN = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


def check_device(device: str) -> None:
    """Raise ValueError unless `device` is cpu, mps, cuda or cuda:N and that device exists on this machine."""
    if not DEVICE_PATTERN.match(device):
        raise ValueError("use cpu, cuda, cuda:N or mps (or leave it unset to pick cuda when available)")
    if device == "cpu":
        return
    import torch  # only for an explicit accelerator, so configs without one validate without torch

    if device == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError("mps is not available on this machine")
        return
    if not torch.cuda.is_available():
        raise ValueError("CUDA is not available on this machine (no GPU, or a CPU-only torch build); use device=cpu")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ValueError(f"this machine has {torch.cuda.device_count()} CUDA device(s), so {device} does not exist")
