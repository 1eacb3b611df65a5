"""Options of stage dpo: the section `dpo`."""

from __future__ import annotations

from typing import ClassVar, Literal, Optional

from rlhf_time.stages.section import Section, option


class DPOOptions(Section):
    """dpo: the loss variant, its temperature and the reference policy."""

    former_names: ClassVar[dict[str, str]] = {
        "beta": "beta", "dpo_loss_type": "loss_type", "dpo_label_smoothing": "label_smoothing", "rpo_alpha": "rpo_alpha",
        "precompute_ref_logps": "precompute_ref_logps", "ref_model": "ref_model"}

    beta: float = option(0.1, "Temperature beta of the implicit reward beta * (logp - ref_logp).", gt=0)
    loss_type: Literal["sigmoid", "ipo", "hinge"] = option("sigmoid", "Loss variant: sigmoid (DPO), ipo or hinge.")
    label_smoothing: float = option(0.0, "Conservative-DPO label smoothing epsilon.", ge=0, lt=0.5)
    rpo_alpha: Optional[float] = option(None, "Weight of an SFT (NLL) term on the chosen response; None disables.", ge=0)
    precompute_ref_logps: bool = option(False, "Compute the reference log-probs once before training.")
    ref_model: Optional[str] = option(None, "Folder or hub id of the reference policy; None = the initial policy (a "
                                            "frozen copy, or the model with its LoRA adapters disabled).")
