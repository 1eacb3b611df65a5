"""Fault injection, NaN: a non-finite gradient or weight at a chosen step, under both nan_policy values.

The gradient is poisoned with a hook on the embedding weight (the loss stays finite, so a loss-only check
misses it); weights are poisoned from a step callback, which runs before that step's checkpoint is written.
"""

import json
import os
import stat

import pytest
import torch

from rlhf_time import SFTrainer
from rlhf_time.cli import main
from rlhf_time.errors import RlhfTimeError

from ..trainer.helpers import merged, tiny_config, weights

BAD_STEP = 3
SMALL = dict(max_train_samples=24, batch_size=4, max_seq_length=48)


def _poison_gradient_at(trainer, steps, value=float("inf")):
    """Make the embedding's gradient non-finite during the given (1-based) optimiser steps."""
    embedding = trainer.model.get_input_embeddings().weight
    embedding.register_hook(lambda grad: grad * value if trainer.global_step + 1 in steps else grad)


def _record_weights_after_each_step(trainer):
    history = {0: weights(trainer.model)}
    trainer.callbacks.append(lambda t: history.__setitem__(t.global_step, weights(t.model)))
    return history


def test_stop_policy_refuses_the_update_of_an_infinite_gradient(tmp_path, tiny_model_dir):
    trainer = SFTrainer(tiny_config(tmp_path, tiny_model_dir, **SMALL, max_steps=5, save_strategy="steps", save_steps=1))
    _poison_gradient_at(trainer, {BAD_STEP})
    history = _record_weights_after_each_step(trainer)
    with pytest.raises(RlhfTimeError, match=r"non-finite gradient norm \(.*\) at step 3.*checkpoint-2"):
        trainer.train()
    for name, before in history[BAD_STEP - 1].items():  # the update of step 3 was never applied
        assert torch.equal(before, dict(trainer.model.named_parameters())[name].detach()), name
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_skip_step_policy_drops_one_update_and_trains_on(tmp_path, tiny_model_dir, value):
    trainer = SFTrainer(tiny_config(tmp_path, tiny_model_dir, **SMALL, max_steps=5, nan_policy="skip_step", logging_steps=1))
    _poison_gradient_at(trainer, {BAD_STEP}, value)
    history = _record_weights_after_each_step(trainer)
    trainer.train()
    for name in history[0]:
        assert torch.equal(history[BAD_STEP - 1][name], history[BAD_STEP][name]), name  # skipped: unchanged
    assert any(not torch.equal(history[BAD_STEP][n], history[BAD_STEP + 1][n]) for n in history[0])  # trains on
    assert all(torch.isfinite(w).all() for w in history[5].values())
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    skipped = [row["step"] for row in rows if row.get("train/update_skipped")]
    assert skipped == [BAD_STEP]


def test_skip_step_policy_stops_after_n_consecutive_skips(tmp_path, tiny_model_dir):
    trainer = SFTrainer(tiny_config(tmp_path, tiny_model_dir, **SMALL, max_steps=8, nan_policy="skip_step",
                                    nan_max_consecutive_skips=2, save_strategy="steps", save_steps=1))
    _poison_gradient_at(trainer, {3, 4, 5})
    with pytest.raises(RlhfTimeError, match=r"at step 4: 2 consecutive steps skipped"):
        trainer.train()


def test_non_finite_weights_are_never_saved(tmp_path, tiny_model_dir):
    trainer = SFTrainer(tiny_config(tmp_path, tiny_model_dir, **SMALL, max_steps=4, save_strategy="steps", save_steps=1))

    def poison_weights(t):
        if t.global_step == BAD_STEP:
            with torch.no_grad():
                t.model.get_input_embeddings().weight[0, 0] = float("nan")

    trainer.callbacks.append(poison_weights)
    with pytest.raises(RlhfTimeError, match=r"NaN/inf after step 3; .*checkpoint-3 was not written.*checkpoint-2"):
        trainer.train()
    assert sorted(p.name for p in trainer.run_dir.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not list(trainer.run_dir.glob(".checkpoint-*"))


def test_infinite_learning_rate_is_a_config_error(tmp_path, tiny_model_dir, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(f"model_name: {tiny_model_dir}\ntrain_file: x.jsonl\nlearning_rate: .inf\n", encoding="utf-8")
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "learning_rate: must be a finite number" in err and "Traceback" not in err


def test_consecutive_skips_are_counted_across_a_resume(tmp_path, tiny_model_dir):
    """Steps 3 and 4 skipped, checkpoint after each step; resumed from checkpoint-3 (one skip so far), a second
    consecutive skip at step 4 must still reach nan_max_consecutive_skips=2 (a counter restarting at 0 would not)."""
    settings = dict(**SMALL, max_steps=8, nan_policy="skip_step", nan_max_consecutive_skips=2, save_strategy="steps",
                    save_steps=1)
    first = SFTrainer(tiny_config(tmp_path, tiny_model_dir, **settings))
    _poison_gradient_at(first, {3, 4})
    with pytest.raises(RlhfTimeError, match=r"at step 4: 2 consecutive steps skipped"):
        first.train()
    state = json.loads((first.run_dir / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["non_finite_skips"] == {"consecutive_skips": 1, "skipped_steps": 1}
    resumed = SFTrainer(tiny_config(tmp_path, tiny_model_dir, **settings, resume_from_checkpoint=str(first.run_dir / "checkpoint-3")))
    _poison_gradient_at(resumed, {4})
    with pytest.raises(RlhfTimeError, match=r"at step 4: 2 consecutive steps skipped"):
        resumed.train()


# ---------------------------------------------------------------------------------------- PPO's critic
def _ppo(tmp_path, model_dir, **overrides):
    from rlhf_time import PPOTrainer

    from ..trainer.test_ppo import ppo_config

    small = dict(gradient_accumulation_steps=1, ppo={"num_mini_batches": 1, "epochs": 1},
                 rollout={"max_completion_length": 4})
    return PPOTrainer(ppo_config(tmp_path, model_dir, **merged(small, overrides)))


def _poison_critic_gradient_at(trainer, step, value=float("nan")):
    parameter = next(p for p in trainer.critic.parameters() if p.requires_grad)
    parameter.register_hook(lambda grad: grad * value if trainer.global_step + 1 == step else grad)


def _critic_is_finite(state):
    return all(torch.isfinite(tensor).all() for tensor in state["critic"].values())


def test_critic_with_a_non_finite_gradient_stops_without_updating_it(tmp_path, tiny_model_dir):
    trainer = _ppo(tmp_path, tiny_model_dir, max_steps=3, save_strategy="steps", save_steps=1)
    _poison_critic_gradient_at(trainer, 2)
    after_step = {}
    trainer.callbacks.append(lambda t: after_step.__setitem__(t.global_step, weights(t.critic)))
    with pytest.raises(RlhfTimeError, match=r"critic: non-finite gradient norm \(nan\) at step 2.*checkpoint-1"):
        trainer.train()
    for name, before in after_step[1].items():  # no critic update of step 2 was applied
        assert torch.equal(before, dict(trainer.critic.named_parameters())[name].detach()), name


def test_critic_skip_step_drops_the_update_and_trains_on(tmp_path, tiny_model_dir):
    trainer = _ppo(tmp_path, tiny_model_dir, max_steps=3, nan_policy="skip_step", nan_max_consecutive_skips=10)
    _poison_critic_gradient_at(trainer, 2, float("inf"))
    after_step = {0: weights(trainer.critic)}
    trainer.callbacks.append(lambda t: after_step.__setitem__(t.global_step, weights(t.critic)))
    trainer.train()
    assert all(torch.equal(after_step[1][n], after_step[2][n]) for n in after_step[0])  # step 2: skipped
    assert any(not torch.equal(after_step[2][n], after_step[3][n]) for n in after_step[0])  # step 3 trains
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if row.get("train/value/update_skipped")] == [2]
    assert _critic_is_finite({"critic": after_step[3]})
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((trainer.run_dir / "critic").stat().st_mode) == 0o777 & ~umask  # not mkdtemp's 0o700


def test_a_diverging_critic_is_never_saved(tmp_path, tiny_model_dir):
    """ppo.critic_learning_rate=1e6: the run stops; no checkpoint, and no critic/, holds a non-finite critic."""
    trainer = _ppo(tmp_path, tiny_model_dir, max_steps=3, ppo={"critic_learning_rate": 1e6}, save_strategy="steps",
                   save_steps=1)
    with pytest.raises(RlhfTimeError, match=r"critic: non-finite|NaN/inf"):
        trainer.train()
    from rlhf_time.runtime.checkpoint import load_stage_state

    for checkpoint in trainer.run_dir.glob("checkpoint-*"):
        assert _critic_is_finite(load_stage_state(checkpoint)), checkpoint
    assert not (trainer.run_dir / "critic").exists()


def test_non_finite_critic_weights_are_never_saved(tmp_path, tiny_model_dir):
    for save in ("steps", "no"):
        trainer = _ppo(tmp_path / save, tiny_model_dir, max_steps=1, save_strategy=save, save_steps=1)

        def poison(t):
            with torch.no_grad():
                next(iter(t.critic.parameters()))[0].fill_(float("nan"))

        trainer.callbacks.append(poison)
        with pytest.raises(RlhfTimeError, match=r"NaN/inf after step 1; .*(stage_state\.pt|critic) was not written"):
            trainer.train()
        assert not list(trainer.run_dir.glob("checkpoint-*")) and not (trainer.run_dir / "critic").exists()
