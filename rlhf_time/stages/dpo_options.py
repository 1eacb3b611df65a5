"""Options of stage dpo: the section `dpo`."""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Optional

from pydantic import model_validator

from rlhf_time.stages.section import Section, option

REFERENCE_FREE = ("orpo", "simpo")  # loss types that need no reference model


class DPOOptions(Section):
    """dpo: the loss variant, its temperature and the reference policy."""

    former_names: ClassVar[dict[str, str]] = {
        "beta": "beta", "dpo_loss_type": "loss_type", "dpo_label_smoothing": "label_smoothing", "rpo_alpha": "rpo_alpha",
        "precompute_ref_logps": "precompute_ref_logps", "ref_model": "ref_model"}

    beta: float = option(0.1, "Temperature beta of the implicit reward beta * (logp - ref_logp); SimPO's reward "
                              "scale (default 2.0 when loss_type is simpo).", gt=0)
    loss_type: Literal["sigmoid", "ipo", "hinge", "orpo", "simpo"] = option(
        "sigmoid", "Loss variant: sigmoid (DPO), ipo, hinge, or the reference-free orpo and simpo.")
    label_smoothing: float = option(0.0, "Conservative-DPO label smoothing epsilon.", ge=0, lt=0.5)
    rpo_alpha: Optional[float] = option(None, "Weight of an SFT (NLL) term on the chosen response; None disables.", ge=0)
    precompute_ref_logps: bool = option(False, "Compute the reference log-probs once before training.")
    ref_model: Optional[str] = option(None, "Folder or hub id of the reference policy; None = the initial policy (a "
                                            "frozen copy, or the model with its LoRA adapters disabled).")
    orpo_lambda: float = option(0.1, "ORPO: weight lambda of the odds-ratio term next to the chosen reply's NLL.", ge=0)
    simpo_gamma: float = option(0.5, "SimPO: target reward margin gamma.")
    cpo_alpha: float = option(0.0, "SimPO: weight of an NLL term on the chosen reply (TRL CPO's cpo_alpha).", ge=0)

    @model_validator(mode="before")
    @classmethod
    def _simpo_beta(cls, values: Any) -> Any:
        """SimPO's beta defaults to 2.0 (Meng et al. 2024), DPO's to 0.1: the default follows loss_type."""
        if isinstance(values, dict) and values.get("loss_type") == "simpo" and "beta" not in values:
            return {**values, "beta": 2.0}
        return values

    @model_validator(mode="after")
    def _reference_free_needs_no_reference(self) -> "DPOOptions":
        if self.loss_type in REFERENCE_FREE:
            for name in ("ref_model", "precompute_ref_logps"):
                if getattr(self, name):
                    raise ValueError(f"loss_type {self.loss_type} is reference-free: {name} does not apply")
        return self
