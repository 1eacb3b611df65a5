"""The stage contract: what a stage declares and the public hooks the loop calls, checked on small custom stages
and on the shipped ones (no stage overrides a private method of the loop; auxiliary models are frozen, placed and
kept out of the optimizer; prepare_step runs before items are counted; update may take several optimiser steps)."""

from pathlib import Path

import pytest
import torch

from rlhf_time import DPOTrainer, SFTrainer, TrainerCallback, TrainingConfig
from rlhf_time.config import ConfigError
from rlhf_time.constants import IGNORE_INDEX
from rlhf_time.stages import STAGE_TRAINERS
from rlhf_time.stages.trainers import TRAINERS, AuxiliaryModel, Trainer

from .helpers import tiny_config, weights
from .test_reward import preference_files

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_the_stage_list_is_the_trainer_registry():
    assert list(TRAINERS) == list(STAGE_TRAINERS) and {"sft", "rm", "dpo", "kd"} <= set(TRAINERS)
    with pytest.raises(ConfigError, match="unknown stage 'ppo_typo'; available: sft, rm, dpo, kd"):
        TrainingConfig(stage="ppo_typo")
    for stage, trainer in TRAINERS.items():
        assert trainer.data_kind in ("conversation", "preference", "unpaired", "prompt") and trainer.model_head in ("causal_lm", "reward")


def test_no_stage_overrides_a_private_method_of_the_loop():
    private = {name for cls in Trainer.__mro__ for name in vars(cls) if name.startswith("_") and not name.startswith("__")}
    for stage, trainer in TRAINERS.items():
        for cls in trainer.__mro__[: trainer.__mro__.index(Trainer)]:
            assert private.isdisjoint(vars(cls)), f"{stage}: {cls.__name__} overrides {private & set(vars(cls))}"


def test_every_example_config_is_valid():
    files = sorted(EXAMPLES.glob("*.yaml"))
    assert len(files) >= 6
    for path in files:
        TrainingConfig.from_yaml(path)


def test_the_dpo_reference_lives_in_the_auxiliary_slot(tmp_path, tiny_model_dir):
    trainer = DPOTrainer(tiny_config(tmp_path, tiny_model_dir, stage="dpo", max_steps=1, **preference_files(tmp_path, 8, 4)))
    reference = trainer.aux["reference"]
    assert trainer.reference is reference and reference is not trainer.model
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    assert all(p.device == trainer.device for p in reference.parameters())
    before = weights(reference)
    trainer.train()
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised and optimised.isdisjoint(id(p) for p in reference.parameters())
    assert all(torch.equal(before[n], p) for n, p in reference.named_parameters())  # still the initial policy


class HalfTargets(SFTrainer):
    """prepare_step drops the first half of every row's targets; the loss must be normalised by what is left."""

    seen: list = []

    def prepare_step(self, micro_batches, dataset):
        for batch in micro_batches:
            for row in batch["labels"]:
                targets = (row != IGNORE_INDEX).nonzero().flatten()
                row[targets[: len(targets) // 2]] = IGNORE_INDEX
        return micro_batches

    def compute_loss(self, model, batch, num_items):
        self.seen.append((num_items, batch["labels"].clone()))
        return super().compute_loss(model, batch, num_items)


def test_prepare_step_runs_before_the_items_are_counted(tmp_path, tiny_model_dir):
    trainer = HalfTargets(tiny_config(tmp_path, tiny_model_dir, max_steps=1, batch_size=4, gradient_accumulation_steps=2))
    trainer.train()
    counted = sum(int((labels[:, 1:] != IGNORE_INDEX).sum()) for _, labels in trainer.seen)
    assert len(trainer.seen) == 2 and all(num_items == counted for num_items, _ in trainer.seen)


class TwoPasses(SFTrainer):
    """Two optimiser steps over each prepared batch (as PPO epochs would), with its own metric."""

    def update(self, micro_batches):
        first = self.optimizer_step(micro_batches)
        second = self.optimizer_step(micro_batches)
        self.record_metrics({"train/first_pass_loss": first["train/loss"]})
        return second

    def optimizer_steps_per_update(self):
        return 2


def test_update_may_take_several_optimizer_steps_with_one_schedule(tmp_path, tiny_model_dir):
    trainer = TwoPasses(tiny_config(tmp_path, tiny_model_dir, max_steps=3, lr_scheduler_type="linear",
                                    warmup_steps_ratio=0.0, logging_steps=1))
    logged = []
    trainer.callbacks.append(type("Spy", (TrainerCallback,), {"on_step_end": lambda self, t, m: logged.append(m)})())
    trainer.train()
    assert trainer.global_step == 3
    state = trainer.optimizer.state_dict()["state"]
    assert {int(s["step"]) for s in state.values()} == {6}  # 2 optimiser steps per loop step
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)  # the schedule spans all 6
    assert all(m["train/first_pass_loss"] > m["train/loss"] for m in logged)  # the second pass saw a trained model


class Distiller(SFTrainer):
    """The docs' worked example: a custom stage with a teacher declared in the auxiliary slot."""

    def auxiliary_models(self):
        return [AuxiliaryModel("teacher", source=self.config.model_name, same_vocabulary=True, cast_to_amp_dtype=True)]


def test_declared_auxiliary_models_are_loaded_frozen_and_cast(tmp_path, tiny_model_dir):
    trainer = Distiller(tiny_config(tmp_path, tiny_model_dir, use_amp=True))
    teacher = trainer.aux["teacher"]
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}  # the AMP dtype (bf16 on CPU)
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}  # master weights stay fp32
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


class CountingStage(SFTrainer):
    """Keeps its own state (a tensor counting the target tokens it trained on) in its checkpoints."""

    def __init__(self, config):
        super().__init__(config)
        self.tokens_seen = torch.zeros((), dtype=torch.long)

    def prepare_step(self, micro_batches, dataset):
        self.tokens_seen += sum(self.count_items(b) for b in micro_batches)
        return micro_batches

    def stage_state(self):
        return {"tokens_seen": self.tokens_seen.clone(), "note": "plain values too"}

    def load_stage_state(self, state):
        assert state["note"] == "plain values too"
        self.tokens_seen = state["tokens_seen"]


def test_a_stage_state_is_checkpointed_and_restored(tmp_path, tiny_model_dir):
    settings = dict(max_steps=4, save_strategy="steps", save_steps=2)
    full = CountingStage(tiny_config(tmp_path / "full", tiny_model_dir, **settings))
    full.train()
    at_two = torch.load(full.run_dir / "checkpoint-2" / "stage_state.pt", weights_only=True)["tokens_seen"]
    resumed = CountingStage(tiny_config(tmp_path / "full", tiny_model_dir, experiment_name="again", **settings))
    resumed.load_from_checkpoint(full.run_dir / "checkpoint-2")
    assert resumed.tokens_seen == at_two > 0
    resumed.train()
    assert resumed.tokens_seen == full.tokens_seen


def test_a_stage_registered_outside_the_package_is_a_stage(tmp_path, tiny_model_dir):
    from rlhf_time.stages import STAGES, register_stage
    from rlhf_time.stages.trainers import trainer_for

    class Mine(SFTrainer):
        pass

    with pytest.raises(ValueError, match="unknown option sections"):
        register_stage("mine", Mine, sections=("nonsense",))
    with pytest.raises(ValueError, match="already exists"):
        register_stage("sft", Mine)
    register_stage("mine", Mine, sections=("rollout",))
    try:
        config = tiny_config(tmp_path, tiny_model_dir, stage="mine", rollout={"max_completion_length": 5})
        assert config.rollout.max_completion_length == 5
        with pytest.raises(ConfigError, match="grpo"):
            TrainingConfig(stage="mine", grpo={"num_generations": 2})  # a section the stage does not read
        assert type(trainer_for(config)) is Mine
    finally:
        STAGES.pop("mine")
