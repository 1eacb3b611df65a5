"""AdamW groups, mixed precision on CPU, and checkpoint contents."""

import torch

from rlhf_time import SFTrainer

from .helpers import tiny_config, weights


def test_no_weight_decay_on_biases_and_norm_weights(tmp_path, tiny_model_dir):
    trainer = SFTrainer(tiny_config(tmp_path, tiny_model_dir, max_steps=1, weight_decay=0.1))
    trainer.train()
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    groups = {group["weight_decay"]: [names[id(p)] for p in group["params"]] for group in trainer.optimizer.param_groups}
    assert all("norm" in n for n in groups[0.0])
    assert not any("norm" in n for n in groups[0.1]) and any("q_proj" in n for n in groups[0.1])
    assert trainer.optimizer.defaults["betas"] == (0.9, 0.999) and trainer.optimizer.defaults["eps"] == 1e-8


def test_bf16_autocast_on_cpu_keeps_float32_master_weights(tmp_path, tiny_model_dir):
    trainer = SFTrainer(tiny_config(tmp_path, tiny_model_dir, max_steps=3, use_amp=True))
    before = weights(trainer.model)
    results = trainer.train()
    assert trainer.amp_dtype == torch.bfloat16 and trainer.scaler is None
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    assert results["train_loss"] == results["train_loss"]  # finite, not NaN


def test_checkpoint_holds_everything_needed_to_resume(tmp_path, tiny_model_dir):
    trainer = SFTrainer(tiny_config(tmp_path, tiny_model_dir, max_steps=2, save_strategy="steps", save_steps=2))
    trainer.train()
    folder = trainer.run_dir / "checkpoint-2"
    for name in ("model.safetensors", "tokenizer.json", "optimizer.pt", "scheduler.pt", "rng_state.pt",
                 "trainer_state.json", "config.yaml"):
        assert (folder / name).is_file(), name
    assert not any(p.suffix == ".bin" for p in folder.iterdir())
