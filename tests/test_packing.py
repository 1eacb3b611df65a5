"""Padding-free packing and token-budget batching: same logits, same loss, same update, exact resume."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf_time.data import PackingCollator, PaddingCollator, first_fit_decreasing
from rlhf_time.stages.sft import SFTrainer
from tests.trainer.helpers import assert_resume_is_exact, tiny_config, weights


def _examples(lengths, vocab=200, seed=0):
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(3, vocab) for _ in range(n)]
        prompt = rng.randrange(1, n)
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def test_first_fit_decreasing_places_every_item_once_within_capacity():
    lengths = [7, 3, 9, 2, 5, 5, 1, 12]
    bins = first_fit_decreasing(lengths, capacity=10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 or len(b) == 1 for b in bins)
    assert len(bins) == 5  # 12 | 9+1 | 7+3 | 5+5 | 2


def test_packed_rows_restart_positions_and_never_predict_across_examples():
    examples = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]},
                {"input_ids": [4], "labels": [4]}]
    batch = PackingCollator(pad_token_id=0, row_length=5)(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [4, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, -100, -100, -100, -100]]
    assert batch["seq_lens"].tolist() == [3, 2, 1]
    mask = batch["attention_mask"][0, 0].int()
    assert mask.tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    assert batch["attention_mask"][1, 0, 1:, 0].sum() == 0  # padding never sees the example (and vice versa)
    varlen = PackingCollator(pad_token_id=0, varlen=True)(examples)
    assert varlen["input_ids"].shape == (1, 6) and "attention_mask" not in varlen
    assert varlen["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]


@pytest.mark.parametrize("model_fixture", ["tiny_model_dir", "llama_model_dir"])
def test_packed_logits_equal_per_example_logits(request, model_fixture):
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(model_fixture), attn_implementation="sdpa")
    model.eval()
    examples = _examples([9, 4, 13, 6, 2, 11])
    batch = PackingCollator(pad_token_id=0, row_length=20)(examples)
    assert batch["input_ids"].shape[0] < len(examples)  # several examples really share rows
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits
        lengths = [len(e["input_ids"]) for e in examples]
        for row, indices in enumerate(first_fit_decreasing(lengths, 20)):
            start = 0
            for i in indices:
                alone = model(input_ids=torch.tensor([examples[i]["input_ids"]])).logits[0]
                torch.testing.assert_close(packed[row, start : start + lengths[i]], alone, atol=1e-5, rtol=1e-5)
                start += lengths[i]


def test_packed_loss_equals_padded_loss_on_the_same_batch(tmp_path, tiny_model_dir):
    trainer = SFTrainer(tiny_config(tmp_path, tiny_model_dir))
    indices = trainer.epoch_plan(0)[0]
    examples = [trainer.train_dataset[i] for i in indices]
    padded = PaddingCollator(pad_token_id=trainer.tokenizer.pad_token_id)(examples)
    packed = PackingCollator(pad_token_id=trainer.tokenizer.pad_token_id, row_length=128)(examples)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]
    assert trainer.count_items(packed) == trainer.count_items(padded)
    num_items = trainer.count_items(padded) + 7  # as if other micro-batches shared the step
    with torch.no_grad():
        loss_padded, _ = trainer.compute_loss(trainer.model, padded, num_items)
        loss_packed, _ = trainer.compute_loss(trainer.model, packed, num_items)
        logits = trainer.model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    reference = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), padded["labels"][:, 1:].flatten(),
                                                  reduction="sum") / num_items
    torch.testing.assert_close(loss_packed, loss_padded, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(loss_packed, reference, atol=1e-6, rtol=1e-5)


def test_one_packed_step_gives_the_same_weights_as_a_padded_step(tmp_path, tiny_model_dir):
    runs = {}
    for packing in (False, True):
        trainer = SFTrainer(tiny_config(tmp_path / str(packing), tiny_model_dir, max_steps=1, packing=packing,
                                        gradient_accumulation_steps=2))
        before = weights(trainer.model)
        trainer.train()
        runs[packing] = weights(trainer.model)
    for name, value in runs[False].items():
        assert not torch.equal(value, before[name]), name  # the step really changed it
        # Adam's first step is ~lr * sign(grad): float noise in near-zero gradients moves a weight by a
        # small fraction of lr (1e-3), no more.
        torch.testing.assert_close(runs[True][name], value, atol=1e-5, rtol=1e-5)


def test_token_budget_batches_visit_every_example_once_and_resume_exactly(tmp_path, tiny_model_dir):
    """group_by_length + max_tokens_per_batch (+ packing) end to end: budgets hold, an epoch covers every example
    once, and an interrupted run resumed from its checkpoint is bit-identical to an uninterrupted one."""
    common = dict(max_tokens_per_batch=160, group_by_length=True, packing=True, max_steps=8, save_strategy="steps",
                  save_steps=4, logging_steps=1, num_train_epochs=3, max_train_samples=32)
    full = SFTrainer(tiny_config(tmp_path / "full", tiny_model_dir, **common))
    lengths = full.train_dataset.lengths
    plan = full.epoch_plan(0)
    assert sorted(i for batch in plan for i in batch) == list(range(len(lengths)))
    assert all(max(lengths[i] for i in batch) * len(batch) <= 160 or len(batch) == 1 for batch in plan)
    assert len({len(b) for b in plan}) > 1  # the budget, not batch_size, decides the batch sizes
    assert len(plan) < 8  # so the run below crosses an epoch boundary
    full.train()

    assert_resume_is_exact(full, tmp_path, tiny_model_dir, **common)
