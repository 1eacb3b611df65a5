"""Online DPO (stage online_dpo): pairs of the policy's own samples, judged by the run's rewards, trained with the DPO
loss against the initial policy; the loss by hand from full logits, ties left out, and the held-out sampled reward
rising from a half-trained model."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf_time import OnlineDPOTrainer, TrainingConfig
from rlhf_time.errors import RlhfTimeError

from .grpo_helpers import InjectedGRPOTrainer
from .helpers import merged, tiny_config
from .test_grpo import full_logits_logps, held_out_reward


def online_config(tmp_path, model_dir, **overrides):
    values = dict(stage="online_dpo", max_train_samples=8, max_eval_samples=4, batch_size=2,
                  rollout={"max_completion_length": 8, "reward_funcs": ["tests.trainer.grpo_helpers:char_share"]},
                  max_steps=2, learning_rate=1e-3, logging_steps=1, temperature=0.9)
    return tiny_config(tmp_path, model_dir, **merged(values, overrides))


class InjectedOnlineDPOTrainer(OnlineDPOTrainer):
    """The two samples of each prompt fixed by the test (as InjectedGRPOTrainer's first two)."""

    sample_rollout = InjectedGRPOTrainer.sample_rollout


def all_equal(prompts, completions, **_):
    return [1.0] * len(completions)


def test_the_loss_is_dpo_on_the_judged_pairs_by_hand(tmp_path, tiny_model_dir):
    beta = 0.2
    trainer = InjectedOnlineDPOTrainer(online_config(tmp_path, tiny_model_dir, dpo={"beta": beta}))
    with torch.no_grad():  # the policy moves away from the reference, so the log-ratios are not 0
        for p in trainer.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    batch = trainer.prepare_step([trainer.collate([0, 1], trainer.train_dataset)], trainer.train_dataset)[0]
    loss, metrics = trainer.compute_loss(trainer.train_model, batch, trainer.count_items(batch))

    width = batch["loss_mask"].shape[1]
    texts = trainer.tokenizer.batch_decode([row[m].tolist() for row, m in zip(batch["input_ids"][:, -width:],
                                                                            batch["loss_mask"])], skip_special_tokens=True)
    answers = [trainer.train_dataset.columns["response"][i] for i in (0, 1) for _ in range(2)]
    scores = [sum(a == b for a, b in zip(t, r)) / max(len(t), len(r)) for t, r in zip(texts, answers)]
    policy = (full_logits_logps(trainer.model, batch, 0.9) * batch["loss_mask"]).sum(-1).tolist()
    reference_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    reference = (full_logits_logps(reference_model, batch, 0.9) * batch["loss_mask"]).sum(-1).tolist()
    losses = []
    for pair in range(2):
        first, second = 2 * pair, 2 * pair + 1
        if scores[first] == scores[second]:
            continue
        won, lost = (first, second) if scores[first] > scores[second] else (second, first)
        margin = beta * ((policy[won] - reference[won]) - (policy[lost] - reference[lost]))
        losses.append(-math.log(1 / (1 + math.exp(-margin))))
    assert losses, "the injected samples should not all tie"
    assert trainer.count_items(batch) == len(losses)
    assert loss.item() == pytest.approx(sum(losses) / len(losses), rel=1e-4, abs=1e-6)
    assert metrics["rewards/accuracies"].item() <= len(losses)


def test_ties_are_left_out_and_counted(tmp_path, tiny_model_dir):
    trainer = InjectedOnlineDPOTrainer(online_config(tmp_path, tiny_model_dir), reward_funcs=[all_equal])
    batch = trainer.prepare_step([trainer.collate([0, 1], trainer.train_dataset)], trainer.train_dataset)[0]
    assert trainer.count_items(batch) == 0 and trainer._stage_metrics["train/online_dpo/ties"] == 1.0
    loss, _ = trainer.compute_loss(trainer.train_model, batch, 0)
    assert loss.item() == 0.0
    results = trainer.train()  # every pair a tie: steps run, nothing moves the loss
    assert results["global_step"] == 2


def test_reference_free_losses_and_a_reference_model_are_refused(tmp_path, tiny_model_dir):
    with pytest.raises(RlhfTimeError, match="stage online_dpo trains against the initial policy"):
        OnlineDPOTrainer(online_config(tmp_path, tiny_model_dir, dpo={"loss_type": "simpo"}))
    assert TrainingConfig(stage="online_dpo", dpo={"beta": 0.5}).dpo.beta == 0.5  # its section: dpo (+ rollout)


def test_online_dpo_raises_the_sampled_reward_on_held_out_prompts(tmp_path, half_trained, capsys):
    config = online_config(tmp_path, half_trained, max_train_samples=None, max_eval_samples=64, batch_size=8,
                           max_steps=40, learning_rate=3e-4, temperature=0.7, lr_scheduler_type="constant",
                           weight_decay=0.0, logging_steps=10)
    trainer = OnlineDPOTrainer(config)
    before, exact_before = held_out_reward(trainer)
    trainer.train()
    after, exact_after = held_out_reward(trainer)
    with capsys.disabled():
        print(f"\nonline DPO held-out sampled reward {before:.3f} -> {after:.3f}; greedy exact match "
              f"{exact_before:.3f} -> {exact_after:.3f}")
    assert after > before + 0.02
