"""torch_compile=true: the compiled model trains to the same losses as the eager one, and stays the same module."""

from __future__ import annotations

import pytest
import torch

from rlhf_time import SFTrainer
from rlhf_time.data.quickstart import PROMPT, to_chinese
from tests.conftest import write_jsonl
from tests.trainer.helpers import tiny_config, train_losses


def _compile_works() -> str:
    """'' when torch.compile (inductor: needs a C++ compiler on CPU) can run here, else the reason."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(3))
    except Exception as error:  # noqa: BLE001 - any backend failure means the option cannot be tested here
        return f"torch.compile cannot run on this machine: {type(error).__name__}: {str(error)[:200]}"
    return ""


def _one_layer_model(folder, tiny_model_dir):
    """The tiny model's shape with one decoder layer: the compiled graphs are a quarter as long to build."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.num_hidden_layers, config.layer_types = 1, config.layer_types[:1]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


def test_compiled_and_eager_training_give_the_same_losses(tmp_path, tiny_model_dir):
    reason = _compile_works()
    if reason:
        pytest.skip(reason)
    tiny_model_dir = _one_layer_model(tmp_path / "one-layer", tiny_model_dir)
    # Every example has the same length (4-digit numbers), so every batch has one shape and the forward and backward
    # graphs are compiled once: a new shape would compile again, and a cold compile costs about 20 s a graph on CPU.
    records = [{"prompt": PROMPT.format(number=n), "response": to_chinese(str(n))} for n in range(1234, 9999, 373)]
    data = str(write_jsonl(tmp_path / "same_length.jsonl", records))
    settings = dict(max_steps=3, train_file=data, eval_file=None, max_train_samples=24, max_seq_length=48,
                    logging_steps=1)
    eager = SFTrainer(tiny_config(tmp_path / "eager", tiny_model_dir, **settings))
    eager.train()
    compiled = SFTrainer(tiny_config(tmp_path / "compiled", tiny_model_dir, torch_compile=True, **settings))
    assert compiled.model._compiled_call_impl is not None  # compiled in place
    compiled.train()
    expected = train_losses(eager.run_dir / "metrics.jsonl")
    got = train_losses(compiled.run_dir / "metrics.jsonl")
    assert sorted(got) == [1, 2, 3]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-4), step
    # the updates agree too, and the parameter names are the eager model's (checkpoints load either way)
    eager_weights = dict(eager.model.named_parameters())
    for name, value in compiled.model.named_parameters():
        torch.testing.assert_close(value, eager_weights[name], atol=1e-4, rtol=1e-4)
