"""The loop's exactness: accumulation invariance, schedules, eval loss, resume, early stopping."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf_time import SFTrainer

from .helpers import assert_resume_is_exact, tiny_config, weights


def test_gradient_accumulation_is_exact(tmp_path, tiny_model_dir):
    """8x1, 4x2 and 2x4 see the same data order and must reach the same weights.

    adam_epsilon=1 makes AdamW's update nearly linear in the gradient, so a wrongly weighted micro-batch shows
    up as a weight difference (~1e-3) far above float noise, instead of being hidden by Adam's normalisation.
    """
    results, losses = [], []
    for batch_size, accumulation in ((8, 1), (4, 2), (2, 4)):
        config = tiny_config(tmp_path / f"{batch_size}", tiny_model_dir, batch_size=batch_size,
                             gradient_accumulation_steps=accumulation, group_by_length=False, max_steps=4,
                             learning_rate=1.0, adam_epsilon=1.0, weight_decay=0.0, max_grad_norm=None)
        trainer = SFTrainer(config)
        seen = []
        trainer.callbacks.append(type("Spy", (__import__("rlhf_time").TrainerCallback,), {
            "on_step_end": lambda self, t, m: seen.append(m["train/loss"])})())
        trainer.train()
        results.append(weights(trainer.model))
        losses.append(seen)
    for other, other_losses in zip(results[1:], losses[1:]):
        assert other_losses == pytest.approx(losses[0], rel=1e-5)
        for name in results[0]:
            torch.testing.assert_close(other[name], results[0][name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_learning_rate_schedule_matches_formula(tmp_path, tiny_model_dir, kind):
    total, peak, warmup = 10, 1e-3, 3  # warmup = ceil(0.25 * 10)
    config = tiny_config(tmp_path, tiny_model_dir, max_steps=total, learning_rate=peak, lr_scheduler_type=kind,
                         warmup_steps_ratio=0.25, batch_size=4)
    trainer = SFTrainer(config)
    seen = []
    trainer.callbacks.append(lambda t: seen.append(t.scheduler.get_last_lr()[0]))  # lr for the NEXT step
    trainer.train()

    def expected(step):
        if step < warmup:
            return peak * step / warmup
        progress = (step - warmup) / (total - warmup)
        return peak * {"linear": 1 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress)), "constant": 1.0}[kind]

    assert seen == pytest.approx([expected(step) for step in range(1, total + 1)], abs=1e-12)


def test_eval_loss_equals_token_weighted_model_loss(tmp_path, tiny_model_dir):
    config = tiny_config(tmp_path, tiny_model_dir, eval_batch_size=5)
    trainer = SFTrainer(config)
    metrics = trainer.evaluate()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    total_loss, total_tokens, correct = 0.0, 0, 0
    with torch.no_grad():
        for example in trainer.eval_dataset:
            ids = torch.tensor([example["input_ids"]])
            labels = torch.tensor([example["labels"]])
            out = model(ids, labels=labels)
            tokens = int((labels[:, 1:] != -100).sum())
            total_loss += out.loss.item() * tokens
            total_tokens += tokens
            predicted = out.logits[0, :-1].argmax(-1)
            mask = labels[0, 1:] != -100
            correct += int((predicted[mask] == labels[0, 1:][mask]).sum())
    assert metrics["eval_loss"] == pytest.approx(total_loss / total_tokens, rel=1e-5)
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(total_loss / total_tokens), rel=1e-5)
    assert metrics["eval_token_accuracy"] == pytest.approx(correct / total_tokens)


@pytest.mark.parametrize("use_lora", [False, True])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, tiny_model_dir, use_lora):
    """Stop after step 4 (checkpoint at 4), resume: same losses and bit-identical weights as never stopping.

    48 examples / batch 8 = 6 micro-batches per epoch, accumulation 2 -> 3 steps per epoch: the run crosses an
    epoch boundary after the resume point, with length grouping and shuffling on. LoRA adds dropout (RNG state).
    """
    common = dict(max_steps=8, gradient_accumulation_steps=2, save_strategy="steps", save_steps=4, report_to="none",
                  logging_steps=1, use_lora=use_lora, lora_dropout=0.1, num_train_epochs=3)
    full = SFTrainer(tiny_config(tmp_path / "full", tiny_model_dir, **common))
    full.train()
    assert_resume_is_exact(full, tmp_path, tiny_model_dir, **common)


def test_load_from_checkpoint_continues_from_the_saved_step(tmp_path, tiny_model_dir):
    config = tiny_config(tmp_path, tiny_model_dir, max_steps=2, save_strategy="steps", save_steps=2)
    first = SFTrainer(config)
    first.train()
    second = SFTrainer(tiny_config(tmp_path, tiny_model_dir, max_steps=3))
    second.load_from_checkpoint(first.run_dir / "checkpoint-2")
    assert second.global_step == 2
    for name, value in weights(first.model).items():
        assert torch.equal(value, weights(second.model)[name])
    assert second.train()["global_step"] == 3


def test_early_stopping_stops_and_keeps_the_best(tmp_path, tiny_model_dir):
    # A learning rate this large makes eval loss get worse after the first evaluation.
    config = tiny_config(tmp_path, tiny_model_dir, max_steps=30, learning_rate=0.5, max_grad_norm=None,
                         eval_strategy="steps", eval_steps=2, early_stopping_patience=2, save_strategy="no",
                         save_total_limit=1)
    trainer = SFTrainer(config)
    evaluations = []
    trainer.callbacks.append(type("Spy", (__import__("rlhf_time").TrainerCallback,), {
        "on_evaluate": lambda self, t, m: evaluations.append((t.global_step, m["eval_loss"]))})())
    results = trainer.train()
    assert results["stopped_early"] and results["global_step"] < 30
    best_step, best_loss = min(evaluations, key=lambda e: e[1])
    assert results["best_metric"] == pytest.approx(best_loss)
    assert results["best_checkpoint"].endswith(f"checkpoint-{best_step}")
    # The final model is the best one: re-evaluating it gives the best eval loss.
    assert trainer.evaluate()["eval_loss"] == pytest.approx(best_loss, rel=1e-6)
    assert (trainer.run_dir / f"checkpoint-{best_step}").is_dir()


def test_checkpoint_rotation_never_deletes_the_best(tmp_path, tiny_model_dir):
    config = tiny_config(tmp_path, tiny_model_dir, max_steps=8, learning_rate=0.5, max_grad_norm=None,
                         eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1, save_total_limit=2)
    trainer = SFTrainer(config)
    trainer.train()
    kept = sorted(p.name for p in trainer.run_dir.glob("checkpoint-*"))
    assert len(kept) <= 3 and trainer.best_checkpoint.split("/")[-1] in kept
    assert not list(trainer.run_dir.glob(".checkpoint-*"))  # no staging folders left behind


def test_non_finite_loss_stops_with_a_clear_message(tmp_path, tiny_model_dir):
    from rlhf_time.errors import RlhfTimeError

    trainer = SFTrainer(tiny_config(tmp_path, tiny_model_dir, max_steps=3))
    with torch.no_grad():
        trainer.model.get_input_embeddings().weight.fill_(float("nan"))
    with pytest.raises(RlhfTimeError, match="non-finite loss .* step 1"):
        trainer.train()
