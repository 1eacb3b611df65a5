"""Options of stage rm (reward model): the section `rm`."""

from __future__ import annotations

from typing import ClassVar, Optional

from rlhf_time.stages.section import Section, option


class RMOptions(Section):
    """rm: -log sigmoid(r_chosen - r_rejected - margin) + centering * mean((r_chosen + r_rejected)^2)."""

    former_names: ClassVar[dict[str, str]] = {"reward_margin": "margin", "reward_centering": "centering"}

    margin: float = option(0.0, "Margin m in -log sigmoid(r_c - r_r - m) (a per-pair 'margin' field overrides it).")
    centering: Optional[float] = option(None, "Weight of the centering term mean((r_c + r_r)^2); None disables.", ge=0)
