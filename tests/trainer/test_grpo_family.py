"""GRPO's family options: RLOO advantages (grpo.advantage_estimator: rloo), GSPO's sequence-level ratio
(grpo.importance_sampling_level: sequence) and truncated importance sampling (grpo.tis_cap) with the sampler
mismatch metric, each against formulas written out here (from the papers, verl's core_algos and OpenRLHF), and GSPO
against TRL 1.16's sequence-level GRPO loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from rlhf_time import TrainingConfig
from rlhf_time.loss import rloo_advantages

from .grpo_helpers import InjectedGRPOTrainer
from .test_grpo import full_logits_logps, grpo_config


def verl_rloo(rewards, group):
    """verl's compute_rloo_outcome_advantage, written out: each score times n/(n-1) minus the group mean times
    n/(n-1) (for groups of more than one response)."""
    out = []
    for start in range(0, len(rewards), group):
        chunk = rewards[start : start + group]
        mean = sum(chunk) / group
        out += [r * group / (group - 1) - mean * group / (group - 1) for r in chunk]
    return out


def test_rloo_advantages_are_leave_one_out_and_equal_verls():
    rewards = [0.9, 0.1, 0.4, 0.4, 0.5, 0.5, 0.5, 0.5, 1.0, 0.0, 0.25, 0.75]
    got = rloo_advantages(torch.tensor(rewards), 4).tolist()
    leave_one_out = [r - (sum(rewards[(i // 4) * 4 : (i // 4) * 4 + 4]) - r) / 3 for i, r in enumerate(rewards)]
    assert got == pytest.approx(leave_one_out, abs=1e-6)
    assert got == pytest.approx(verl_rloo(rewards, 4), abs=1e-6)
    assert got[4:8] == [0.0] * 4  # a flat group: exactly no gradient
    scaled = rloo_advantages(torch.tensor(rewards[:4]), 4, scale_rewards="group").tolist()
    std = torch.tensor(rewards[:4]).std().item()
    assert scaled == pytest.approx([a / (std + 1e-4) for a in leave_one_out[:4]], abs=1e-5)


def test_option_defaults_and_refusals():
    assert TrainingConfig(stage="grpo", grpo={"advantage_estimator": "rloo"}).grpo.scale_rewards == "none"
    assert TrainingConfig(stage="grpo", grpo={"advantage_estimator": "rloo", "scale_rewards": "group"}
                          ).grpo.scale_rewards == "group"
    assert TrainingConfig(stage="grpo").grpo.scale_rewards == "group"
    with pytest.raises(Exception, match="tis_cap needs num_iterations 1"):
        TrainingConfig(stage="grpo", grpo={"tis_cap": 2.0, "num_iterations": 2})


def _prepared(tmp_path, model_dir, **grpo):
    trainer = InjectedGRPOTrainer(grpo_config(tmp_path, model_dir, grpo={"loss_type": "dapo", **grpo},
                                              rollout={"max_completion_length": 8}, temperature=0.9))
    batch = trainer.prepare_step([trainer.collate([0, 1], trainer.train_dataset)], trainer.train_dataset)[0]
    return trainer, batch


def test_a_step_with_rloo_trains_on_leave_one_out_advantages(tmp_path, tiny_model_dir):
    trainer, batch = _prepared(tmp_path, tiny_model_dir, advantage_estimator="rloo")
    width = batch["loss_mask"].shape[1]
    texts = trainer.tokenizer.batch_decode([row[m].tolist() for row, m in zip(batch["input_ids"][:, -width:],
                                                                            batch["loss_mask"])], skip_special_tokens=True)
    answers = [trainer.train_dataset.columns["response"][i] for i in (0, 1) for _ in range(4)]
    rewards = [sum(a == b for a, b in zip(t, r)) / max(len(t), len(r)) for t, r in zip(texts, answers)]
    assert batch["advantages"].tolist() == pytest.approx(verl_rloo(rewards, 4), abs=1e-5)


def test_gspo_sequence_ratio_loss_and_gradient_equal_the_written_out_objective(tmp_path, tiny_model_dir):
    eps, eps_high = 0.2, 0.28
    trainer, batch = _prepared(tmp_path, tiny_model_dir, importance_sampling_level="sequence", num_iterations=2)
    trainer.config.rollout.epsilon_high = eps_high
    trainer.policy_loss.keywords["clip_eps_high"] = eps_high
    with torch.no_grad():  # the policy moves after sampling: sequence ratios away from 1, some clipped
        for p in trainer.model.parameters():
            p.add_(0.03 * torch.randn_like(p))
    loss, _ = trainer.compute_loss(trainer.train_model, batch, trainer.count_items(batch))
    loss.backward()
    ours = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.zero_grad()

    # Zheng et al. 2025, eq. 7 with TRL's token aggregation (dapo): s_i = exp(mean_t(logp - logp_old)),
    # l_i = max(-A_i s_i, -A_i clip(s_i, 1 - eps, 1 + eps_high)) on each of the completion's tokens.
    mask = batch["loss_mask"].double()
    logps = full_logits_logps_with_grad(trainer.model, batch, 0.9).double()
    log_ratio = ((logps - batch["old_logps"].double()) * mask).sum(-1) / mask.sum(-1)
    s = torch.exp(log_ratio)
    advantages = batch["advantages"].double()
    per_sequence = torch.maximum(-advantages * s, -advantages * s.clamp(1 - eps, 1 + eps_high))
    expected = (per_sequence * mask.sum(-1)).sum() / mask.sum()
    assert (s.detach() - 1).abs().max() > 1e-3  # the ratios are not all 1
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    expected.backward()
    for name, grad in ours.items():
        torch.testing.assert_close(grad.double(), trainer.model.get_parameter(name).grad.double(), rtol=1e-4, atol=1e-6)


def full_logits_logps_with_grad(model, batch, temperature):
    """As test_grpo.full_logits_logps (log softmax(logits / T) of the completion tokens from full logits), with
    gradients: the written-out objective is differentiated by autograd."""
    width = batch["old_logps"].shape[1]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits.float()
    log_probs = F.log_softmax(logits[:, -width - 1 : -1] / temperature, -1)
    mask = batch["labels"][:, -width:] != -100
    return log_probs.gather(-1, batch["input_ids"][:, -width:, None]).squeeze(-1) * mask


def test_tis_weights_and_the_sampler_mismatch_metric_by_hand(tmp_path, tiny_model_dir):
    cap = 1.5
    trainer, batch = _prepared(tmp_path, tiny_model_dir, tis_cap=cap)
    mask = batch["loss_mask"].bool()
    train_logps = full_logits_logps(trainer.model, batch, 0.9)
    # fp32, sampler = this model: the sampling log-probs equal the training forward's, the weights are 1
    assert ((batch["old_logps"] - train_logps).abs() * mask).max() < 1e-5
    _, metrics = trainer.compute_loss(trainer.train_model, batch, trainer.count_items(batch))
    assert abs(metrics["sampler_kl"].item()) < 1e-6 and metrics["tis_weight"].item() == pytest.approx(1.0, abs=1e-5)

    # Injected sampler log-probs: the sampler put these tokens at logp - offset
    offsets = torch.tensor([-0.6, -0.2, 0.0, 0.1, 0.35, 0.5, 1.0, -1.0])  # per row
    batch["old_logps"] = torch.where(mask, train_logps - offsets[:, None], batch["old_logps"])
    loss, metrics = trainer.compute_loss(trainer.train_model, batch, trainer.count_items(batch))
    advantages, rows = batch["advantages"].tolist(), mask.tolist()
    terms, weights, gaps = [], [], []
    for i, row in enumerate(rows):
        for kept in row:
            if kept:  # mu = 1: rho = 1, the surrogate is -A; times min(exp(offset), cap)
                w = min(math.exp(offsets[i].item()), cap)
                terms.append(-advantages[i] * w)
                weights.append(w)
                gaps.append(-offsets[i].item())
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-4, abs=1e-6)
    assert metrics["tis_weight"].item() == pytest.approx(sum(weights) / len(weights), rel=1e-5)
    assert metrics["sampler_kl"].item() == pytest.approx(sum(gaps) / len(gaps), rel=1e-4, abs=1e-6)


# ----------------------------------------------------------------------------------------------- REINFORCE++
def openrlhf_reinforce(scores, logps, ref_logps, mask, kl_coef, gamma=1.0):
    """OpenRLHF's REINFORCE++ written out in Python floats: compute_reward (k1 KL per token, the score added at the
    last action), get_cumulative_returns, then the global normalisation of _normalize_advantages
    (mean, biased variance, rstd = max(var, 1e-8) ** -0.5)."""
    returns = []
    for score, row_logps, row_ref, row_mask in zip(scores, logps, ref_logps, mask):
        length = sum(row_mask)
        rewards = [-kl_coef * (row_logps[t] - row_ref[t]) if row_mask[t] else 0.0 for t in range(len(row_mask))]
        rewards[length - 1] += score
        running, row_returns = 0.0, [0.0] * len(row_mask)
        for t in reversed(range(len(row_mask))):
            running = rewards[t] * row_mask[t] + gamma * running
            row_returns[t] = running
        returns.append(row_returns)
    kept = [r for row, m in zip(returns, mask) for r, k in zip(row, m) if k]
    mean = sum(kept) / len(kept)
    var = sum((r - mean) ** 2 for r in kept) / len(kept)
    rstd = max(var, 1e-8) ** -0.5
    return [[(r - mean) * rstd if k else 0.0 for r, k in zip(row, m)] for row, m in zip(returns, mask)]


def test_reinforce_pp_advantages_equal_openrlhfs_written_out():
    from rlhf_time.loss import discounted_returns, masked_moments, token_rewards, whiten_over_step

    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    logps, ref_logps = -torch.rand(4, 5) * 3, -torch.rand(4, 5) * 3
    scores = torch.tensor([1.0, 0.0, 0.5, 0.25])
    rewards, _ = token_rewards(logps, ref_logps, scores, mask, kl_coef=0.05)
    returns = discounted_returns(rewards, mask)
    ours = whiten_over_step(returns, mask, masked_moments(returns, mask))
    expected = openrlhf_reinforce(scores.tolist(), logps.tolist(), ref_logps.tolist(), mask.int().tolist(), 0.05)
    torch.testing.assert_close(ours, torch.tensor(expected), rtol=1e-5, atol=1e-6)
    # split in two (micro-batches or ranks): the step's moments, summed, give the same advantages
    halves = [slice(0, 2), slice(2, 4)]
    moments = sum(masked_moments(returns[h], mask[h]) for h in halves)
    split = torch.cat([whiten_over_step(returns[h], mask[h], moments) for h in halves])
    torch.testing.assert_close(split, ours)


@pytest.mark.parametrize("estimator", ["reinforce_pp", "reinforce_pp_baseline"])
def test_a_reinforce_pp_step_folds_the_kl_into_rewards_and_whitens_over_the_whole_step(tmp_path, tiny_model_dir,
                                                                                      estimator):
    kl_coef = 0.1
    trainer = InjectedGRPOTrainer(grpo_config(tmp_path, tiny_model_dir, rollout={"max_completion_length": 8},
                                              grpo={"advantage_estimator": estimator, "kl_coef": kl_coef,
                                                    "loss_type": "dapo"}, temperature=0.9))
    with torch.no_grad():  # the policy moves away from the reference, so the KL part of the rewards is not 0
        for p in trainer.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    whole = trainer.prepare_step([trainer.collate([0, 1], trainer.train_dataset)], trainer.train_dataset)
    split = trainer.prepare_step([trainer.collate([0], trainer.train_dataset), trainer.collate([1], trainer.train_dataset)],
                                 trainer.train_dataset)  # accumulation 2: the same advantages
    batch = whole[0]
    torch.testing.assert_close(torch.cat([b["advantages"] for b in split]), batch["advantages"], rtol=1e-5, atol=1e-6)

    width = batch["loss_mask"].shape[1]
    texts = trainer.tokenizer.batch_decode([row[m].tolist() for row, m in zip(batch["input_ids"][:, -width:],
                                                                            batch["loss_mask"])], skip_special_tokens=True)
    answers = [trainer.train_dataset.columns["response"][i] for i in (0, 1) for _ in range(4)]
    scores = [sum(a == b for a, b in zip(t, r)) / max(len(t), len(r)) for t, r in zip(texts, answers)]
    if estimator == "reinforce_pp_baseline":  # OpenRLHF's reinforce_baseline: minus the group's mean
        scores = [s - sum(scores[i // 4 * 4 : i // 4 * 4 + 4]) / 4 for i, s in enumerate(scores)]
    expected = openrlhf_reinforce(scores, batch["old_logps"].tolist(), batch["ref_logps"].tolist(),
                                  batch["loss_mask"].int().tolist(), kl_coef)
    torch.testing.assert_close(batch["advantages"], torch.tensor(expected), rtol=1e-4, atol=1e-5)

    # The loss holds no KL term (it is in the rewards): mu = 1, rho = 1, so it is -mean of the token advantages.
    loss, metrics = trainer.compute_loss(trainer.train_model, batch, trainer.count_items(batch))
    mask = batch["loss_mask"]
    assert loss.item() == pytest.approx(-(batch["advantages"] * mask).sum().item() / mask.sum().item(), abs=1e-6)
    assert kl_coef * metrics["kl"].item() > 1e-5  # still measured and logged: in the loss it would have shown


def test_gspo_loss_equals_trls_sequence_level_loss(tmp_path, tiny_model_dir):
    """TRL 1.16 GRPOTrainer(importance_sampling_level="sequence", loss_type="grpo"), the GSPO paper's setup, on the
    same completions, old log-probs, advantages and weights (prompts of one length: TRL's forward takes no position
    ids, so left padding would move its positions)."""
    pytest.importorskip("trl")
    import copy

    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer as TRLGRPOTrainer

    eps, eps_high, temperature = 0.2, 0.28, 0.9
    trainer = InjectedGRPOTrainer(grpo_config(tmp_path, tiny_model_dir, temperature=temperature,
                                              rollout={"max_completion_length": 8, "epsilon_high": eps_high},
                                              grpo={"importance_sampling_level": "sequence", "num_iterations": 2,
                                                    "loss_type": "grpo"}))
    lengths = [len(ids) for ids in trainer.train_dataset.input_ids]
    same = [i for i in range(len(lengths)) if lengths[i] == lengths[0]][:2]
    assert len(same) == 2
    batch = trainer.prepare_step([trainer.collate(same, trainer.train_dataset)], trainer.train_dataset)[0]
    assert (batch["attention_mask"][:, : batch["input_ids"].shape[1] - batch["loss_mask"].shape[1]] == 1).all()
    with torch.no_grad():  # the policy moves after sampling: the sequence ratios leave 1, some are clipped
        for p in trainer.model.parameters():
            p.add_(0.03 * torch.randn_like(p))
    trl_model = copy.deepcopy(trainer.model)
    ours, _ = trainer.compute_loss(trainer.train_model, batch, trainer.count_items(batch))

    args = GRPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, num_generations=4,
                      per_device_train_batch_size=8, max_completion_length=8, temperature=temperature, beta=0.0,
                      epsilon=eps, epsilon_high=eps_high, importance_sampling_level="sequence", loss_type="grpo")
    trl_trainer = TRLGRPOTrainer(model=trl_model, reward_funcs=lambda completions, **_: [0.0] * len(completions),
                                 args=args, train_dataset=Dataset.from_list([{"prompt": "a"}] * 8),
                                 processing_class=trainer.tokenizer)
    trl_trainer.current_gradient_accumulation_steps = 1
    width = batch["loss_mask"].shape[1]
    inputs = {"prompt_ids": batch["input_ids"][:, :-width], "prompt_mask": batch["attention_mask"][:, :-width],
              "completion_ids": batch["input_ids"][:, -width:], "completion_mask": batch["loss_mask"].long(),
              "advantages": batch["advantages"], "old_per_token_logps": batch["old_logps"]}
    trl_model.train()
    theirs = trl_trainer._compute_loss(trl_model, inputs)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)
    assert abs(ours.item()) > 1e-3  # not a trivially zero loss
    ours.backward()
    theirs.backward()
    trl_parameters = dict(trl_model.named_parameters())
    for name, parameter in trainer.model.named_parameters():
        torch.testing.assert_close(parameter.grad, trl_parameters[name].grad, rtol=1e-4, atol=1e-6)
