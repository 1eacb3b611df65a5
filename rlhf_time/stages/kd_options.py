"""Options of stage kd (knowledge distillation): the section `kd`."""

from __future__ import annotations

from typing import ClassVar, Literal, Optional

from rlhf_time.stages.section import Section, option


class KDOptions(Section):
    """kd: loss = alpha * CE(data) + (1 - alpha) * KD(teacher, student)."""

    former_names: ClassVar[dict[str, str]] = {
        "teacher_model": "teacher_model", "teacher_adapter": "teacher_adapter", "kd_alpha": "alpha",
        "kd_temperature": "temperature", "kd_loss_type": "loss_type", "kd_beta": "beta",
        "kd_on_policy_ratio": "on_policy_ratio"}

    teacher_model: Optional[str] = option(None, "The teacher (local folder or hub id); it must share the student's vocabulary.")
    teacher_adapter: Optional[str] = option(None, "A LoRA adapter folder applied to the teacher (merged at load).")
    alpha: float = option(0.5, "loss = alpha * CE(data) + (1 - alpha) * KD(teacher, student).", ge=0, le=1)
    temperature: float = option(1.0, "Softmax temperature tau of both models (the KD term is scaled by tau^2).", gt=0)
    loss_type: Literal["forward", "reverse", "jsd"] = option(
        "forward", "forward KL(teacher||student), reverse KL(student||teacher) or jsd (generalised JSD, beta).")
    beta: float = option(0.5, "JSD mixture weight beta in (0, 1); M = beta p_teacher + (1 - beta) p_student.", gt=0, lt=1)
    on_policy_ratio: float = option(
        0.0, "Share of steps trained on the student's own sampled replies, scored by the teacher (GKD lambda); "
             "sampled with the generation settings (max_new_tokens, temperature, top_p, top_k).", ge=0, le=1)
