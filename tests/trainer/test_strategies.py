"""Full, LoRA and frozen-layer fine-tuning on the tiny model: what should change changed, the rest is bit-identical."""

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from rlhf_time import SFTrainer
from rlhf_time.models import decoder_layers

from .helpers import tiny_config, weights


def test_full_fine_tuning_changes_every_weight(tmp_path, tiny_model_dir):
    trainer = SFTrainer(tiny_config(tmp_path, tiny_model_dir, max_steps=3))
    before = weights(trainer.model)
    trainer.train()
    after = weights(trainer.model)
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert unchanged == []


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_leaves_base_bit_identical_and_round_trips_through_peft(tmp_path, tiny_model_dir, checkpointing):
    config = tiny_config(tmp_path, tiny_model_dir, use_lora=True, lora_target_modules=None, max_steps=3,
                         learning_rate=1e-2, use_gradient_checkpointing=checkpointing)
    trainer = SFTrainer(config)
    before = weights(trainer.model)
    results = trainer.train()
    after = weights(trainer.model)
    for name in before:
        if "lora_" in name:
            if "lora_B" in name:  # B starts at zero, so it must have moved
                assert not torch.equal(before[name], after[name]), name
        else:
            assert torch.equal(before[name], after[name]), name

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, results["final_model_dir"]).eval()
    trainer.model.eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 8]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, trainer.model(ids).logits)
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)(ids).logits
    assert not torch.allclose(plain, reloaded(ids).logits)  # the adapter does something


@pytest.mark.parametrize("checkpointing", [False, True])
def test_frozen_layers_are_bit_identical_and_the_rest_trains(tmp_path, llama_model_dir, checkpointing):
    config = tiny_config(tmp_path, llama_model_dir, freeze_layers=[0, 1], max_steps=3,
                         use_gradient_checkpointing=checkpointing)
    trainer = SFTrainer(config)
    layers = decoder_layers(trainer.model)
    frozen_before = [weights(layers[i]) for i in (0, 1)]
    before = weights(trainer.model)
    trainer.train()
    for i, snapshot in zip((0, 1), frozen_before):
        for name, value in weights(layers[i]).items():
            assert torch.equal(snapshot[name], value), f"layer {i} {name}"
    changed = [n for n, v in weights(trainer.model).items() if not torch.equal(before[n], v)]
    assert any(".layers.2." in n for n in changed) and any("embed_tokens" in n for n in changed)
    assert not any(".layers.0." in n or ".layers.1." in n for n in changed)
