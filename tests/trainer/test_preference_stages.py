"""Reward model and DPO on tiny models: they learn the synthetic preference task, and their numbers are exact."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf_time import DPOTrainer, RewardTrainer, TrainerCallback
from rlhf_time.trainer.reward import score_file

from .helpers import tiny_config, weights

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"
PAIRS = dict(train_file=str(EXAMPLES / "preference_train.jsonl"), eval_file=str(EXAMPLES / "preference_eval.jsonl"))


class Recorder(TrainerCallback):
    def __init__(self):
        self.steps, self.evals = [], []

    def on_step_end(self, trainer, metrics):
        self.steps.append(metrics)

    def on_evaluate(self, trainer, metrics):
        self.evals.append(metrics)


def test_reward_model_learns_and_reloads_with_transformers(tmp_path, tiny_model_dir):
    config = tiny_config(tmp_path, tiny_model_dir, stage="rm", max_train_samples=320, max_eval_samples=64,
                         batch_size=16, num_train_epochs=2, learning_rate=1e-3, eval_strategy="epoch", **PAIRS)
    trainer = RewardTrainer(config)
    before = trainer.evaluate()["eval_accuracy"]
    results = trainer.train()
    metrics = trainer.evaluate()
    assert metrics["eval_accuracy"] >= 0.9 > before
    assert set(metrics) >= {"eval_loss", "eval_accuracy", "eval_margin", "eval_reward_mean", "eval_reward_std"}

    reloaded = AutoModelForSequenceClassification.from_pretrained(results["final_model_dir"]).eval()
    prompts, responses = ["把数字写成中文：123", "把数字写成中文：45"], ["一二三", "九九"]
    rewards = trainer.score(prompts, responses)
    tokenizer = trainer.tokenizer
    for prompt, response, reward in zip(prompts, responses, rewards):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": response}], tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            assert reloaded(ids).logits.item() == pytest.approx(reward, abs=1e-5)
    assert rewards[0] > rewards[1]  # right numerals beat wrong ones

    out = tmp_path / "scores.jsonl"
    source = tmp_path / "to_score.jsonl"
    source.write_text('{"prompt": "把数字写成中文：123", "response": "一二三"}\n', encoding="utf-8")
    score_file(results["final_model_dir"], str(source), str(out))
    assert '"reward"' in out.read_text(encoding="utf-8")


def test_reward_loss_is_the_pairwise_formula_and_accumulation_is_exact(tmp_path, tiny_model_dir):
    results = []
    for batch_size, accumulation in ((8, 1), (4, 2)):
        config = tiny_config(tmp_path / str(batch_size), tiny_model_dir, stage="rm", max_train_samples=32,
                             batch_size=batch_size, gradient_accumulation_steps=accumulation, max_steps=3,
                             group_by_length=False, learning_rate=1.0, adam_epsilon=1.0, weight_decay=0.0,
                             max_grad_norm=None, reward_margin=0.5, **PAIRS)
        trainer = RewardTrainer(config)
        batch = trainer.collate(list(range(4)))
        chosen, rejected = trainer.rewards(trainer.model, batch)
        loss, _ = trainer.compute_loss(trainer.model, batch, num_items=4)
        expected = -F.logsigmoid(chosen - rejected - 0.5).mean()
        torch.testing.assert_close(loss, expected)
        trainer.train()
        results.append(weights(trainer.model))
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-5, atol=1e-6)


def _independent_logps(model, input_ids, labels):
    with torch.no_grad():
        logits = model(input_ids).logits[:, :-1]
    targets = labels[:, 1:]
    picked = F.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return (picked * (targets != -100)).sum(-1)


@pytest.mark.parametrize("use_lora", [False, True])
def test_dpo_first_loss_is_log2_and_logps_match_an_independent_computation(tmp_path, tiny_model_dir, use_lora):
    config = tiny_config(tmp_path, tiny_model_dir, stage="dpo", max_train_samples=16, max_eval_samples=8, batch_size=4,
                         max_steps=2, use_lora=use_lora, lora_target_modules=None, **PAIRS)
    trainer = DPOTrainer(config)
    batch = trainer.collate([0, 1, 2])
    policy = trainer.sequence_logps(trainer.model, batch)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    independent = _independent_logps(base, batch["input_ids"], batch["labels"])
    torch.testing.assert_close(policy.detach(), independent, rtol=1e-5, atol=1e-4)
    ref_chosen, ref_rejected = trainer.reference_logps(batch)
    torch.testing.assert_close(torch.cat([ref_chosen, ref_rejected]), independent, rtol=1e-5, atol=1e-4)

    recorder = Recorder()
    trainer.callbacks.append(recorder)
    trainer.train()
    assert recorder.steps[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    # After training, LoRA's reference is still the untouched base model.
    if use_lora:
        ref_chosen, ref_rejected = trainer.reference_logps(batch)
        torch.testing.assert_close(torch.cat([ref_chosen, ref_rejected]), independent, rtol=1e-5, atol=1e-4)


def test_dpo_reward_accuracy_and_margin_rise(tmp_path, tiny_model_dir):
    config = tiny_config(tmp_path, tiny_model_dir, stage="dpo", max_train_samples=160, max_eval_samples=48,
                         batch_size=16, num_train_epochs=2, learning_rate=5e-3, use_lora=True,
                         lora_target_modules=None, lora_rank=16, eval_strategy="epoch", **PAIRS)
    trainer = DPOTrainer(config)
    start = trainer.evaluate()
    trainer.train()
    end = trainer.evaluate()
    assert start["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert end["eval_rewards/accuracies"] > 0.8 and end["eval_rewards/margins"] > 0.1
    assert end["eval_loss"] < math.log(2)


def test_precomputed_reference_logps_give_the_same_losses(tmp_path, tiny_model_dir):
    losses = []
    for precompute in (False, True):
        config = tiny_config(tmp_path / str(precompute), tiny_model_dir, stage="dpo", max_train_samples=16,
                             batch_size=4, max_steps=3, precompute_ref_logps=precompute, learning_rate=1e-2, **PAIRS)
        trainer = DPOTrainer(config)
        recorder = Recorder()
        trainer.callbacks.append(recorder)
        trainer.train()
        assert (trainer.reference is None) == precompute
        losses.append([m["train/loss"] for m in recorder.steps])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
