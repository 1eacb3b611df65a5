"""Reward model on the tiny Qwen: it learns the synthetic preference task, its numbers are exact, and its saved
folder scores like the trainer (full model with transformers, LoRA adapter with score_file)."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification

from rlhf_time import RewardTrainer
from rlhf_time.data.quickstart import make_preference_records
from rlhf_time.inference import load_reward_model, score_file

from ..conftest import write_jsonl
from .helpers import tiny_config, weights

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"


def preference_files(tmp_path, train=300, eval=50):
    eval_records = make_preference_records(eval, seed=11)
    numbers = {r["prompt"].split("：")[1] for r in eval_records}
    train_records = make_preference_records(train, seed=10, exclude=numbers)
    return dict(train_file=str(write_jsonl(tmp_path / "train.jsonl", train_records)),
                eval_file=str(write_jsonl(tmp_path / "eval.jsonl", eval_records)))


def test_shipped_example_pairs_are_the_generated_ones():
    eval_records = make_preference_records(64, seed=11)
    train_records = make_preference_records(600, seed=10, exclude={r["prompt"].split("：")[1] for r in eval_records})
    for name, records in (("preference_train.jsonl", train_records), ("preference_eval.jsonl", eval_records)):
        shipped = [json.loads(line) for line in (EXAMPLES / name).read_text(encoding="utf-8").splitlines()]
        assert shipped == records


def test_reward_model_learns_and_reloads_with_transformers(tmp_path, tiny_model_dir):
    config = tiny_config(tmp_path, tiny_model_dir, stage="rm", max_train_samples=None, max_eval_samples=None,
                         batch_size=16, num_train_epochs=2, learning_rate=1.5e-3, warmup_steps_ratio=0.1,
                         **preference_files(tmp_path))
    trainer = RewardTrainer(config)
    before = trainer.evaluate()["eval_accuracy"]
    results = trainer.train()
    metrics = trainer.evaluate()
    assert metrics["eval_accuracy"] >= 0.9 > before
    assert set(metrics) >= {"eval_loss", "eval_accuracy", "eval_margin", "eval_reward_mean", "eval_reward_std"}
    assert metrics["eval_margin"] > 0

    # The saved folder is a plain sequence-classification model; fed one unpadded sequence it gives trainer.score.
    reloaded = AutoModelForSequenceClassification.from_pretrained(results["final_model_dir"]).eval()
    prompts, responses = ["把数字写成中文：123", "把数字写成中文：45"], ["一二三", "九九"]
    rewards = trainer.score(prompts, responses)
    for prompt, response, reward in zip(prompts, responses, rewards):
        text = trainer.tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                                      {"role": "assistant", "content": response}], tokenize=False)
        ids = trainer.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            assert reloaded(ids).logits.item() == pytest.approx(reward, abs=1e-5)
    assert rewards[0] > rewards[1]  # right numerals beat wrong ones

    source = write_jsonl(tmp_path / "to_score.jsonl", [{"prompt": p, "response": r} for p, r in zip(prompts, responses)])
    score_file(results["final_model_dir"], str(source), str(tmp_path / "scores.jsonl"))
    lines = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(line["prompt"], line["response"]) for line in lines] == list(zip(prompts, responses))
    assert [line["reward"] for line in lines] == pytest.approx(rewards, abs=1e-5)


def test_reward_is_read_at_the_last_real_token_of_right_padded_rows(tmp_path, tiny_model_dir):
    trainer = RewardTrainer(tiny_config(tmp_path, tiny_model_dir, stage="rm", **preference_files(tmp_path, 16, 4)))
    assert trainer.tokenizer.pad_token_id != trainer.tokenizer.eos_token_id
    lengths = trainer.train_dataset.lengths
    indices = sorted(range(len(lengths)), key=lengths.__getitem__)[::5][:4]  # rows of different lengths
    batch = trainer.collate(indices, trainer.train_dataset)
    assert (batch["attention_mask"] == 0).any()  # some rows really are padded
    with torch.no_grad():
        chosen, rejected = trainer.rewards(trainer.model, batch)
        hidden = trainer.model.model(input_ids=batch["input_ids"],
                                     attention_mask=batch["attention_mask"]).last_hidden_state  # (2B, T, H)
        last = batch["attention_mask"].sum(-1) - 1  # (2B,)
        manual = hidden[torch.arange(len(last)), last] @ trainer.model.score.weight[0]  # (2B,)
    torch.testing.assert_close(torch.cat([chosen, rejected]), manual, rtol=1e-5, atol=1e-5)


def test_pairwise_loss_with_per_pair_margins_centering_and_identical_pairs(tmp_path, tiny_model_dir):
    records = make_preference_records(4, seed=3)
    records[1]["margin"] = 2.0
    records[2]["margin"] = None  # -> reward_margin
    records.append({**records[0], "rejected": records[0]["chosen"]})  # identical: dropped and reported
    train = write_jsonl(tmp_path / "pairs.jsonl", records)
    config = tiny_config(tmp_path, tiny_model_dir, stage="rm", train_file=str(train), eval_file=None,
                         rm={"margin": 0.5, "centering": 0.01})
    trainer = RewardTrainer(config)
    assert len(trainer.train_dataset) == 4 and trainer.train_dataset.stats.identical_pairs_dropped == 1
    batch = trainer.collate([0, 1, 2, 3], trainer.train_dataset)
    chosen, rejected = trainer.rewards(trainer.model, batch)
    loss, metrics = trainer.compute_loss(trainer.model, batch, num_items=8)  # as if the step had 8 pairs
    margins = torch.tensor([0.5, 2.0, 0.5, 0.5])
    expected = (-F.logsigmoid(chosen - rejected - margins) + 0.01 * (chosen + rejected) ** 2).sum() / 8
    torch.testing.assert_close(loss, expected)
    assert metrics["accuracy"].item() == (chosen > rejected).sum().item()


def test_reward_accumulation_4x1_equals_2x2(tmp_path, tiny_model_dir):
    files = preference_files(tmp_path, 16, 4)
    results = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        config = tiny_config(tmp_path / str(batch_size), tiny_model_dir, stage="rm", batch_size=batch_size,
                             gradient_accumulation_steps=accumulation, max_steps=3, group_by_length=False,
                             learning_rate=1.0, adam_epsilon=1.0, weight_decay=0.0, max_grad_norm=None, **files)
        trainer = RewardTrainer(config)
        trainer.train()
        results.append(weights(trainer.model))
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-5, atol=1e-6)


def test_lora_reward_model_trains_its_score_head_and_its_adapter_folder_scores_the_same(tmp_path, tiny_model_dir):
    config = tiny_config(tmp_path, tiny_model_dir, stage="rm", use_lora=True, lora_target_modules=None, max_steps=2,
                         batch_size=4, learning_rate=1e-2, **preference_files(tmp_path, 8, 4))
    trainer = RewardTrainer(config)
    before = weights(trainer.model)
    trainer.train()
    after = weights(trainer.model)
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("score" in name for name in trainable)  # peft SEQ_CLS: the new head is in modules_to_save
    for name in before:
        changed = not torch.equal(before[name], after[name])
        assert changed == (name in trainable), name  # every trainable weight moved, frozen ones are bit-identical

    final = tmp_path / "outputs" / "run" / "final"
    assert (final / "adapter_config.json").is_file()
    with safe_open(str(final / "adapter_model.safetensors"), "pt") as saved:
        assert any("score" in key for key in saved.keys())
    prompts, responses = ["把数字写成中文：78", "把数字写成中文：305"], ["七八", "三零五"]
    expected = trainer.score(prompts, responses)
    model, tokenizer = load_reward_model(str(final))
    assert not math.isnan(expected[0])
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": p, "response": r} for p, r in zip(prompts, responses)])
    score_file(str(final), str(source), str(tmp_path / "out.jsonl"))
    rewards = [json.loads(line)["reward"] for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rewards == pytest.approx(expected, abs=1e-5)
