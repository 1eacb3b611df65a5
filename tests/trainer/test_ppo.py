"""PPO on the tiny Qwen: ratio exactly 1 and nothing clipped on the first mini-batch, KL penalty 0 at step 0, the
experience equals written-out formulas, the critic's value loss falls on a fixed rollout, a dense reward rises on
held-out prompts under a KL bound, exact resume mid-run."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from rlhf_time import PPOTrainer
from rlhf_time.experience.sampler import sample

from .helpers import merged, Recorder, interrupted_then_resumed, tiny_config, weights


def ppo_config(tmp_path, model_dir, **overrides):
    values = dict(stage="ppo", max_train_samples=8, max_eval_samples=4, batch_size=2, gradient_accumulation_steps=2,
                  ppo={"num_mini_batches": 2, "epochs": 2, "critic_learning_rate": 1e-3},
                  rollout={"max_completion_length": 6, "reward_funcs": ["tests.trainer.ppo_helpers:char_share"]},
                  max_steps=2, learning_rate=1e-3,
                  logging_steps=1)
    return tiny_config(tmp_path, model_dir, **merged(values, overrides))


def first_rollout(trainer):
    plan = trainer.epoch_plan(0)[: trainer.config.gradient_accumulation_steps]
    return trainer.prepare_step([trainer.collate(indices, trainer.train_dataset) for indices in plan], trainer.train_dataset)


def test_first_minibatch_has_ratio_one_and_nothing_clipped_and_kl_is_zero(tmp_path, tiny_model_dir):
    trainer = PPOTrainer(ppo_config(tmp_path, tiny_model_dir))
    recorder = Recorder()
    trainer.callbacks.append(recorder)
    first_step_history = []
    trainer.callbacks.append(lambda t: first_step_history.extend(t.update_history) if t.global_step == 1 else None)
    trainer.train()
    first = first_step_history[0]
    assert first["train/policy/ratio_deviation"] == 0.0
    assert first["train/policy/clipfrac"] == 0.0
    assert first["train/policy/approx_kl"] == 0.0
    step0 = recorder.steps[0]
    assert step0["train/kl"] == 0.0 and step0["train/kl_k3"] == 0.0 and step0["train/non_score_reward"] == 0.0
    # later mini-batches train on a moved policy
    assert any(m["train/policy/ratio_deviation"] > 0 for m in first_step_history[1:])
    assert len(first_step_history) == 4  # ppo_epochs x num_mini_batches
    assert recorder.steps[1]["train/kl"] != 0.0
    for key in ("train/reward", "train/reward_std", "train/kl_coef", "train/value/explained_variance",
                "train/value/loss", "train/value/clipfrac", "train/completions/mean_length", "train/entropy",
                "train/rlhf_reward"):
        assert key in step0, key
    assert step0["train/logps_sampling_gap"] < 1e-4  # sampling's log-probs equal the training forward's


def test_experience_equals_written_out_formulas(tmp_path, tiny_model_dir):
    config = ppo_config(tmp_path, tiny_model_dir,
                        ppo={"kl_coef": 0.3, "gamma": 0.9, "lam": 0.8, "whiten_advantages": False,
                             "missing_eos_penalty": 1.0},
                        temperature=0.7)
    trainer = PPOTrainer(config)
    with torch.no_grad():  # make the reference differ from the policy so the KL term is not 0
        for p in trainer.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    for batch in first_rollout(trainer):
        mask = batch["loss_mask"]
        width = mask.shape[1]
        with torch.no_grad():
            logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   position_ids=batch["position_ids"]).logits.float()
            ref_logits = trainer.aux["reference"](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                                  position_ids=batch["position_ids"]).logits.float()
        tokens = batch["input_ids"][:, -width:, None]
        logps = F.log_softmax(logits[:, -width - 1 : -1] / 0.7, -1).gather(-1, tokens).squeeze(-1) * mask
        ref = F.log_softmax(ref_logits[:, -width - 1 : -1] / 0.7, -1).gather(-1, tokens).squeeze(-1) * mask
        torch.testing.assert_close(batch["old_logps"], logps, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(batch["ref_logps"], ref, rtol=1e-4, atol=1e-4)
        for row in range(mask.shape[0]):
            n = int(mask[row].sum())
            score = float(batch["scores"][row])
            rewards = [-0.3 * (float(logps[row, t]) - float(ref[row, t])) for t in range(n)]
            rewards[-1] += score
            values = batch["values"][row, :n].tolist()
            advantage, expected = 0.0, [0.0] * n
            for t in reversed(range(n)):
                next_value = values[t + 1] if t + 1 < n else 0.0
                advantage = rewards[t] + 0.9 * next_value - values[t] + 0.9 * 0.8 * advantage
                expected[t] = advantage
            torch.testing.assert_close(batch["advantages"][row, :n], torch.tensor(expected), rtol=1e-3, atol=1e-4)
            torch.testing.assert_close(batch["returns"][row, :n], torch.tensor(expected) + batch["values"][row, :n],
                                       rtol=1e-3, atol=1e-4)
        # missing_eos_penalty: truncated completions lose 1 from their score
        raw = torch.tensor([0.0])  # scores are the char_share reward minus the penalty where truncated
        assert ((batch["scores"] <= 1.0 - batch["truncated"].float()) | ~batch["truncated"]).all(), raw


def test_entropy_bonus_subtracts_entropy_coef_times_the_policys_token_entropy(tmp_path, tiny_model_dir):
    trainer = PPOTrainer(ppo_config(tmp_path, tiny_model_dir, temperature=0.7))
    batch = first_rollout(trainer)[0]
    mask, items = batch["loss_mask"], int(batch["loss_mask"].sum())
    plain, _ = trainer.compute_loss(trainer.model, batch, items)
    trainer.config.ppo.entropy_coef = 0.3
    with_bonus, metrics = trainer.compute_loss(trainer.model, batch, items)
    width = mask.shape[1]
    with torch.no_grad():  # written out: the entropy of softmax(logits / T) at each completion position
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               position_ids=batch["position_ids"]).logits.float()[:, -width - 1 : -1] / 0.7
        log_probs = F.log_softmax(logits, -1)
        entropy = (-(log_probs.exp() * log_probs).sum(-1) * mask).sum()
    torch.testing.assert_close(with_bonus, plain - 0.3 * entropy / items, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["policy/entropy"], entropy, rtol=1e-5, atol=1e-5)
    with_bonus.backward()  # differentiable through the policy
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.model.parameters())


def test_critic_value_loss_falls_over_updates_on_a_fixed_rollout(tmp_path, tiny_model_dir):
    trainer = PPOTrainer(ppo_config(tmp_path, tiny_model_dir, ppo={"critic_learning_rate": 1e-4, "value_clip": 10.0},
                                    rollout={"reward_funcs": ["tests.trainer.ppo_helpers:one"]}
                                    ))
    rollout = first_rollout(trainer)  # fixed: the critic steps alone, the policy is not trained here
    losses = [trainer.critic_step(rollout)["train/value/loss"] for _ in range(6)]
    # value_clip is wide here: with a fixed rollout the clipped loss stops falling once values are value_clip away
    assert losses[-1] < 0.25 * losses[0], losses  # printed on failure


def test_resume_mid_run_is_exact(tmp_path, tiny_model_dir):
    settings = dict(max_steps=4, save_strategy="steps", save_steps=2, temperature=0.8,
                    ppo={"kl_target": 0.5, "kl_horizon": 10.0, "num_mini_batches": 1},
                    rollout={"max_completion_length": 4},
                    gradient_accumulation_steps=1)
    full = PPOTrainer(ppo_config(tmp_path / "full", tiny_model_dir, **settings))
    full.train()
    resumed = interrupted_then_resumed(lambda resume: PPOTrainer(ppo_config(
        tmp_path / "resumed", tiny_model_dir, **({"resume_from_checkpoint": "latest"} if resume else {}), **settings)),
        stop_at_step=3)
    for a, b in ((full.model, resumed.model), (full.critic, resumed.critic)):
        expected, got = weights(a), weights(b)
        assert all(torch.equal(expected[name], got[name]) for name in expected)
    assert full.kl_controller.value == resumed.kl_controller.value != 0.05
    rows = {}
    for name, trainer in (("full", full), ("resumed", resumed)):
        lines = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
        rows[name] = {line["step"]: (line["train/loss"], line["train/reward"], line["train/value/loss"])
                      for line in lines if "train/loss" in line}
    assert all(rows["resumed"][step] == rows["full"][step] for step in (3, 4))


def held_out_reward(trainer, seed=123, samples=8):
    """Mean dense reward of sampled completions of the held-out prompts (fixed sampling seed, written-out reward),
    and greedy exact match."""
    from .ppo_helpers import char_share

    dataset, config = trainer.eval_dataset, trainer.config
    prompts = [ids for ids in dataset.input_ids for _ in range(samples)]
    rollout = sample(trainer.model, prompts, max_new_tokens=config.rollout.max_completion_length,
                     pad_token_id=trainer.tokenizer.pad_token_id, stop_token_ids=trainer.inference.stop_token_ids(),
                     temperature=config.temperature, top_k=config.top_k, generator=torch.Generator().manual_seed(seed))
    texts = trainer.tokenizer.batch_decode(rollout.completion_lists(), skip_special_tokens=True)
    answers = [a for a in dataset.columns["response"] for _ in range(samples)]
    reward = sum(char_share(None, texts, answers)) / len(texts)
    greedy = trainer.predict(dataset.prompts)
    exact = sum(a == r for a, r in zip(greedy, dataset.columns["response"])) / len(dataset)
    return reward, exact


KL_BOUND = 4.0  # nats per completion (k1 of the step's samples): measured max 1.7-3.2 over seeds 42, 7, 8


def test_ppo_raises_the_sampled_reward_on_held_out_prompts_within_a_kl_bound(tmp_path, half_trained, capsys):
    """Measured on 64 held-out prompts x 8 samples after 40 steps: 0.319 -> 0.381 / 0.356 / 0.362 for seeds 42, 7, 8
    (the reward at steps 10..40 rises nearly monotonically under this cosine schedule)."""
    config = ppo_config(tmp_path, half_trained, max_train_samples=None, max_eval_samples=64, batch_size=16,
                        gradient_accumulation_steps=2, rollout={"max_completion_length": 8},
                        ppo={"num_mini_batches": 2, "epochs": 1, "critic_learning_rate": 3e-4, "kl_coef": 0.1,
                             "lam": 1.0},
                        max_steps=40, learning_rate=5e-4, temperature=0.7,
                        lr_scheduler_type="cosine", weight_decay=0.0, logging_steps=10)
    trainer = PPOTrainer(config)
    recorder = Recorder()
    trainer.callbacks.append(recorder)
    before, exact_before = held_out_reward(trainer)
    trainer.train()
    after, exact_after = held_out_reward(trainer)
    kls = [m["train/kl"] for m in recorder.steps]
    with capsys.disabled():
        print(f"\nPPO held-out sampled reward {before:.3f} -> {after:.3f}; greedy exact match {exact_before:.3f} -> "
              f"{exact_after:.3f}; KL max {max(kls):.3f}, last {kls[-1]:.3f}; explained variance last "
              f"{recorder.steps[-1]['train/value/explained_variance']:.3f}")
    assert after > before + 0.02
    assert max(kls) < KL_BOUND


def test_ppo_defaults_raise_the_sampled_reward(tmp_path, half_trained, capsys):
    """Every PPO option at its default (epochs 4, lam 0.95, kl_coef 0.05, the critic at the policy's learning rate);
    only what a user must choose is set: data, reward, the policy's learning rate, steps, completion length.
    Measured (64 held-out prompts x 8 samples, temperature 1, 50 steps at lr 2e-4): 0.270 -> 0.292 / 0.329 / 0.303
    for seeds 42 / 7 / 8; with the former critic_learning_rate default 1e-5 the same run unlearned, 0.270 -> 0.210
    (docs/stages.md, PPO)."""
    config = tiny_config(
        tmp_path,
        half_trained,
        stage="ppo",
        max_train_samples=None,
        max_eval_samples=64,
        learning_rate=2e-4,
        max_steps=50,
        logging_steps=10,
        rollout={"max_completion_length": 8, "reward_funcs": ["tests.trainer.ppo_helpers:char_share"]},
    )
    trainer = PPOTrainer(config)
    assert trainer.critic_optimizer.optimizer.param_groups[0]["initial_lr"] == 2e-4
    before, _ = held_out_reward(trainer)
    trainer.train()
    after, _ = held_out_reward(trainer)
    with capsys.disabled():
        print(f"\nPPO on its defaults: held-out sampled reward {before:.3f} -> {after:.3f}")
    assert after > before + 0.01


def test_lora_policy_reference_is_the_adapter_free_policy_and_the_critic_has_its_own_adapter(tmp_path, tiny_model_dir):
    config = ppo_config(tmp_path, tiny_model_dir, use_lora=True, lora_target_modules=None, max_steps=2,
                        ppo={"epochs": 1, "num_mini_batches": 1}, rollout={"max_completion_length": 4},
                        gradient_accumulation_steps=1)
    trainer = PPOTrainer(config)
    assert "reference" not in trainer.aux  # no second copy: the adapters are disabled instead
    recorder = Recorder()
    trainer.callbacks.append(recorder)
    policy_before, critic_before = weights(trainer.model), weights(trainer.critic)
    second_step_history = []
    trainer.callbacks.append(lambda t: second_step_history.extend(t.update_history) if t.global_step == 2 else None)
    trainer.train()
    assert recorder.steps[0]["train/kl"] == 0.0
    # lora_dropout (0.1 by default) is switched off: once the adapters are non-zero (step 2), the update still scores
    # the sampled tokens with the network that sampled them
    assert trainer.config.lora_dropout > 0 and second_step_history[0]["train/policy/ratio_deviation"] == 0.0
    assert recorder.steps[1]["train/logps_sampling_gap"] < 1e-4
    changed = {name for name, p in weights(trainer.model).items() if not torch.equal(p, policy_before[name])}
    assert changed and all("lora_" in name for name in changed)
    critic_changed = {name for name, p in weights(trainer.critic).items() if not torch.equal(p, critic_before[name])}
    assert any("lora_" in name for name in critic_changed) and any("score" in name for name in critic_changed)
    assert all("lora_" in name or "score" in name for name in critic_changed)


@pytest.mark.parametrize("use_lora", [False, True])
def test_the_trained_critic_is_saved_as_a_model_folder_a_later_run_starts_from(tmp_path, tiny_model_dir, use_lora):
    from transformers import AutoModelForSequenceClassification

    lora = dict(use_lora=True, lora_target_modules=None) if use_lora else {}
    trainer = PPOTrainer(ppo_config(tmp_path / "first", tiny_model_dir, max_steps=1,
                                    ppo={"epochs": 1, "num_mini_batches": 1}, rollout={"max_completion_length": 4},
                                    gradient_accumulation_steps=1, **lora))
    folder = trainer.train()["critic_dir"]
    batch = first_rollout(trainer)[0]
    expected = trainer.completion_values(trainer.critic, batch)
    if not use_lora:  # a plain transformers folder: its score head at every position is the critic's value
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        with torch.no_grad():
            hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 position_ids=batch["position_ids"]).last_hidden_state
            width = batch["loss_mask"].shape[1]
            values = model.score(hidden).squeeze(-1)[:, -width - 1 : -1]
        torch.testing.assert_close(values, expected, rtol=1e-5, atol=1e-5)
    later = PPOTrainer(ppo_config(tmp_path / "later", tiny_model_dir, ppo={"value_model": folder}, max_steps=1, **lora))
    torch.testing.assert_close(later.completion_values(later.critic, batch), expected, rtol=1e-5, atol=1e-5)


def test_early_stopping_restores_the_best_checkpoints_critic_with_its_policy(tmp_path, tiny_model_dir):
    """A constant reward makes every eval_reward equal, so the first evaluation stays the best: after training both
    the policy and the critic are those of checkpoint-1, not of the last step."""
    trainer = PPOTrainer(ppo_config(tmp_path, tiny_model_dir, ppo={"epochs": 1, "num_mini_batches": 1},
                                    rollout={"reward_funcs": ["tests.trainer.ppo_helpers:one"],
                                             "max_completion_length": 4},
                                    max_steps=3, gradient_accumulation_steps=1,
                                    eval_strategy="steps", eval_steps=1,
                                    save_strategy="steps", save_steps=1, early_stopping_patience=10))
    results = trainer.train()
    assert results["best_checkpoint"].endswith("checkpoint-1")
    best = torch.load(trainer.run_dir / "checkpoint-1" / "stage_state.pt", weights_only=True)["critic"]
    last = torch.load(trainer.run_dir / "checkpoint-3" / "stage_state.pt", weights_only=True)["critic"]
    state = trainer.critic.state_dict()
    assert any(not torch.equal(best[name], last[name]) for name in best)  # the critic moved after checkpoint-1
    assert all(torch.equal(state[name], best[name]) for name in best)
