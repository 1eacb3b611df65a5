"""Options of stage kto: the section `kto`."""

from __future__ import annotations

from typing import Literal, Optional

from rlhf_time.stages.section import Section, option


class KTOOptions(Section):
    """kto: the loss variant, its temperature, the weights of the two kinds of example and the reference policy."""

    beta: float = option(0.1, "Temperature beta of the implied reward beta * (logp - ref_logp).", gt=0)
    desirable_weight: float = option(1.0, "lambda_D: weight of the desirable examples' losses.", gt=0)
    undesirable_weight: float = option(1.0, "lambda_U: weight of the undesirable examples' losses.", gt=0)
    loss_type: Literal["kto", "apo_zero_unpaired"] = option(
        "kto", "kto (Ethayarajh et al. 2024, with the KL reference point) or apo_zero_unpaired (no KL term).")
    precompute_ref_logps: bool = option(False, "Compute the reference log-probs once before training (no reference "
                                               "model is kept in memory).")
    ref_model: Optional[str] = option(None, "Folder or hub id of the reference policy; None = the initial policy (a "
                                            "frozen copy, or the model with its LoRA adapters disabled).")
