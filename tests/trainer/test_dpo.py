"""DPO on the tiny Qwen: log-probs and the reference are exact, the first loss is log 2, the implicit reward
accuracy and margin rise, and precomputed reference log-probs change nothing."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from rlhf_time import DPOTrainer, RlhfTimeError

from .helpers import Recorder, tiny_config, weights
from .test_reward import preference_files


def independent_logps(model, input_ids, labels):
    """Summed log p(label) over the labelled positions, from full logits: log_softmax + gather."""
    with torch.no_grad():
        logits = model(input_ids).logits[:, :-1]
    targets = labels[:, 1:]
    picked = F.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return (picked * (targets != -100)).sum(-1)


@pytest.mark.parametrize("use_lora", [False, True])
def test_first_loss_is_log2_and_logps_match_an_independent_computation(tmp_path, tiny_model_dir, use_lora):
    config = tiny_config(tmp_path, tiny_model_dir, stage="dpo", batch_size=4, max_steps=2, use_lora=use_lora,
                         lora_target_modules=None, learning_rate=1e-2, **preference_files(tmp_path, 8, 4))
    trainer = DPOTrainer(config)
    batch = trainer.collate([0, 1, 2], trainer.train_dataset)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    independent = independent_logps(base, batch["input_ids"], batch["labels"])  # (2B,) chosen then rejected
    torch.testing.assert_close(trainer.sequence_logps(trainer.model, batch).detach(), independent, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(torch.cat(trainer.reference_logps(batch)), independent, rtol=1e-5, atol=1e-4)
    before = weights(trainer.model)

    recorder = Recorder()
    trainer.callbacks.append(recorder)
    trainer.train()
    first = recorder.steps[0]
    assert first["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["train/rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert set(first) >= {f"train/{k}" for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies",
                                                   "rewards/margins", "logps/chosen", "logps/rejected")}
    # The policy moved, the reference did not: still the base model's log-probs.
    assert not torch.allclose(trainer.sequence_logps(trainer.model, batch).detach(), independent, atol=1e-4)
    torch.testing.assert_close(torch.cat(trainer.reference_logps(batch)), independent, rtol=1e-5, atol=1e-4)
    after = weights(trainer.model)
    for name, p in trainer.model.named_parameters():
        assert torch.equal(before[name], after[name]) != p.requires_grad, name
    if not use_lora:
        assert not any(p.requires_grad for p in trainer.reference.parameters())


def test_reward_accuracy_and_margin_rise(tmp_path, tiny_model_dir):
    config = tiny_config(tmp_path, tiny_model_dir, stage="dpo", max_train_samples=None, max_eval_samples=None,
                         batch_size=16, num_train_epochs=2, learning_rate=5e-3, use_lora=True, lora_target_modules=None,
                         lora_rank=16, **preference_files(tmp_path, 160, 48))
    trainer = DPOTrainer(config)
    start = trainer.evaluate()
    trainer.train()
    end = trainer.evaluate()
    assert start["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert start["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-6) and start["eval_rewards/accuracies"] == 0.0
    assert end["eval_rewards/accuracies"] > 0.8 and end["eval_rewards/margins"] > 0.1
    assert end["eval_loss"] < math.log(2)
    assert end["eval_logps/chosen"] > start["eval_logps/chosen"]


def test_rpo_adds_the_per_token_nll_of_the_chosen_reply(tmp_path, tiny_model_dir):
    config = tiny_config(tmp_path, tiny_model_dir, stage="dpo", dpo={"rpo_alpha": 0.5},
                         **preference_files(tmp_path, 4, 4))
    trainer = DPOTrainer(config)
    batch = trainer.collate([0, 1, 2], trainer.train_dataset)
    loss, _ = trainer.compute_loss(trainer.model, batch, num_items=3)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    chosen = independent_logps(base, batch["input_ids"][:3], batch["labels"][:3])
    tokens = (batch["labels"][:3, 1:] != -100).sum(-1)
    expected = math.log(2) + 0.5 * (-chosen / tokens).mean()  # policy == reference: the DPO part is log 2
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_lora", [False, True])
def test_precomputed_reference_logps_give_the_same_losses(tmp_path, tiny_model_dir, use_lora):
    files = preference_files(tmp_path, 12, 4)
    losses, evals = [], []
    for precompute in (False, True):
        config = tiny_config(tmp_path / str(precompute), tiny_model_dir, stage="dpo", batch_size=4, max_steps=3,
                             dpo={"precompute_ref_logps": precompute}, use_lora=use_lora, lora_target_modules=None,
                             learning_rate=1e-2, **files)
        trainer = DPOTrainer(config)
        assert trainer.reference is None or not (precompute or use_lora)  # no copy of the model when not needed
        recorder = Recorder()
        trainer.callbacks.append(recorder)
        trainer.train()
        losses.append([m["train/loss"] for m in recorder.steps])
        evals.append(trainer.evaluate()["eval_loss"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert evals[1] == pytest.approx(evals[0], rel=1e-5)
    if not use_lora:  # only the train and eval sets have reference log-probs now
        other = trainer.load_dataset(files["eval_file"], 2)
        with pytest.raises(RlhfTimeError, match="precompute_ref_logps"):
            trainer.evaluate(other)


def test_cli_eval_of_a_trained_dpo_model_uses_the_model_it_started_from(tmp_path, tiny_model_dir, capsys):
    import json

    from rlhf_time.cli import main

    config = tiny_config(tmp_path, tiny_model_dir, stage="dpo", max_steps=6, learning_rate=5e-3, batch_size=4,
                         **preference_files(tmp_path, 16, 8))
    trainer = DPOTrainer(config)
    trainer.train()
    expected = trainer.evaluate()
    path = tmp_path / "dpo.yaml"
    config.to_yaml(path)
    capsys.readouterr()
    assert main(["eval", str(path), f"model_name={trainer.run_dir / 'final'}"]) == 0
    captured = capsys.readouterr()
    metrics = json.loads(captured.out)
    assert f"reference model: {tiny_model_dir}" in captured.err
    assert metrics["eval_loss"] != pytest.approx(math.log(2), abs=1e-3)
    for key in ("eval_loss", "eval_rewards/margins", "eval_rewards/accuracies"):
        assert metrics[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6)
