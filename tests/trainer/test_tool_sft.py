"""SFT on tool-use conversations (examples/data/agent_sft.jsonl): the step's loss is the model's own loss on the
batch, only assistant turns (calls included) are trained, and every weight moves."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf_time import SFTrainer, TrainerCallback

from .helpers import tiny_config, weights

AGENT_DATA = Path(__file__).resolve().parents[2] / "examples" / "data" / "agent_sft.jsonl"


def test_sft_on_tool_calls_loss_is_the_models_loss_and_every_weight_changes(tmp_path, tiny_model_dir):
    config = tiny_config(tmp_path, tiny_model_dir, train_file=str(AGENT_DATA), eval_file=None, max_train_samples=8,
                         batch_size=8, max_steps=1, max_seq_length=1024, group_by_length=False)
    trainer = SFTrainer(config)
    losses = []
    trainer.callbacks.append(type("Spy", (TrainerCallback,), {
        "on_step_end": lambda self, t, metrics: losses.append(metrics["train/loss"])})())
    before = weights(trainer.model)
    examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    trainer.train()

    tokenizer = trainer.tokenizer
    first = examples[0]
    trained = tokenizer.decode([t for t, label in zip(first["input_ids"], first["labels"]) if label != -100])
    # Both assistant turns with their <|im_end|>; not the system turn with the tools, the question or the result.
    assert trained == ('<tool_call>\n{"name": "multiply", "arguments": {"a": 244, "b": 869}}\n</tool_call><|im_end|>'
                       '212036<|im_end|>')

    # Independent reference: the untrained model's own loss on the padded batch.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    width = max(len(e["input_ids"]) for e in examples)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([e["input_ids"] + [pad] * (width - len(e["input_ids"])) for e in examples])
    labels = torch.tensor([e["labels"] + [-100] * (width - len(e["labels"])) for e in examples])
    attention_mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in examples])
    with torch.no_grad():
        reference = model(input_ids, attention_mask=attention_mask, labels=labels).loss.item()
    assert losses == [pytest.approx(reference, rel=1e-4)]

    after = weights(trainer.model)
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert unchanged == []
