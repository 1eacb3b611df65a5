"""Model loading, families, the embedded default and the tuning strategies on tiny models."""

import pytest
import torch
from safetensors.torch import load_file

from rlhf_time import TrainingConfig
from rlhf_time.errors import RlhfTimeError
from rlhf_time.models import apply_tuning, count_parameters, decoder_layers, load_causal_lm, load_tokenizer, model_family
from rlhf_time.models.tiny import tiny_model_path


def test_embedded_default_builds_offline_and_identically(tmp_path):
    first, second = tiny_model_path(tmp_path / "a"), tiny_model_path(tmp_path / "b")
    weights_a, weights_b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()
    assert tiny_model_path(tmp_path / "a") == first  # cached, not rebuilt


def test_tiny_model_is_a_qwen3_of_a_few_million_parameters(tiny_model_dir):
    config = TrainingConfig(model_name=str(tiny_model_dir))
    model = load_causal_lm(config)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert 1_000_000 < count_parameters(model)[1] < 5_000_000
    tokenizer = load_tokenizer(config)
    text = "把数字写成中文：4072 你好 hello"
    assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_family_is_inferred_from_the_model(tiny_model_dir, llama_model_dir):
    assert model_family(TrainingConfig(model_name=str(llama_model_dir))).name == "Llama"
    assert model_family(TrainingConfig(model_name=str(tiny_model_dir))).name == "Qwen"
    assert model_family(TrainingConfig(model_name=str(tiny_model_dir), model_type="llama")).name == "Llama"


def test_unreachable_hub_id_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RlhfTimeError, match="not a local folder.*model_name=tiny"):
        load_causal_lm(TrainingConfig(model_name="no-such-org/no-such-model"))


def test_freeze_layers_freezes_exactly_those_layers(llama_model_dir):
    config = TrainingConfig(model_name=str(llama_model_dir), freeze_layers=[0, 2])
    model = apply_tuning(load_causal_lm(config), config, model_family(config))
    layers = decoder_layers(model)
    assert all(not p.requires_grad for i in (0, 2) for p in layers[i].parameters())
    assert all(p.requires_grad for p in layers[1].parameters())
    assert model.get_input_embeddings().weight.requires_grad


def test_freeze_layer_out_of_range(llama_model_dir):
    config = TrainingConfig(model_name=str(llama_model_dir), freeze_layers=[7])
    with pytest.raises(RlhfTimeError, match="out of range; the model has 3 decoder layers"):
        apply_tuning(load_causal_lm(config), config, model_family(config))


def test_lora_trains_only_adapters_on_family_default_targets(tiny_model_dir):
    config = TrainingConfig(model_name=str(tiny_model_dir), use_lora=True, lora_target_modules=None)
    model = apply_tuning(load_causal_lm(config), config, model_family(config))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    for target in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(f"{target}.lora_A" in n for n in trainable), target


def test_lora_unknown_target_module(tiny_model_dir):
    config = TrainingConfig(model_name=str(tiny_model_dir), use_lora=True, lora_target_modules=["query"])
    with pytest.raises(RlhfTimeError, match=r"\['query'\] not found"):
        apply_tuning(load_causal_lm(config), config, model_family(config))
