"""FSDP loading without a full copy per rank: rank 0 loads, the others build on the meta device and receive only
their shards. Same weights as every rank loading the model itself, and far less memory on the other ranks."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .exit_probe import assert_no_gloo_thread_at_exit
from .settings import failure_report
from .test_data_parallel import torchrun

WORKER = str(Path(__file__).with_name("loading_worker.py"))


@pytest.fixture(scope="module")
def model_of_known_size(tmp_path_factory):
    """A ~63M-parameter float32 model (~250 MB): large enough that its copy dominates a process's memory growth."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from rlhf_time.models.tiny import load_tiny_tokenizer

    tokenizer = load_tiny_tokenizer()
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                         num_attention_heads=12, num_key_value_heads=12, head_dim=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    folder = tmp_path_factory.mktemp("model-250mb")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return folder, size


def _launch(model_dir, out, mode, *overrides):
    result = torchrun(WORKER, str(model_dir), str(out), mode, *overrides, timeout=300)
    assert result.returncode == 0, failure_report(result)
    assert_no_gloo_thread_at_exit(out, launch=mode)  # what made a rank abort at exit, now and then, under load
    return [json.loads((out / f"{mode}-rank{r}.json").read_text()) for r in (0, 1)]


def test_rank0_loading_same_weights_and_random_state_and_less_memory_on_other_ranks(tmp_path, model_of_known_size):
    """With LoRA, so the random init of the adapters (done on rank 0 only now) is checked too."""
    model_dir, size = model_of_known_size
    lora = ("use_lora=true", "lora_target_modules=[q_proj,v_proj]")
    today = _launch(model_dir, tmp_path, "today", *lora)
    rank0 = _launch(model_dir, tmp_path, "rank0", *lora)
    expected, got = load_file(str(tmp_path / "today.safetensors")), load_file(str(tmp_path / "rank0.safetensors"))
    assert any("lora_A" in k for k in expected) and any("lm_head" in k or "embed" in k for k in expected)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    # every rank continues from the random state it had when it loaded the model itself (dropout etc. unchanged)
    assert [r["rng"] for r in today] == [r["rng"] for r in rank0]
    growth = {mode: [r["peak_growth"] / 2**20 for r in runs] for mode, runs in (("today", today), ("rank0", rank0))}
    print(f"model {size / 2**20:.0f} MiB; peak memory growth per rank (MiB): {growth}")
    assert today[1]["peak_growth"] >= 0.9 * size  # every rank used to hold a full copy
    assert rank0[1]["peak_growth"] < 0.75 * size  # now: its half of the shards plus one tensor in flight


def test_auxiliary_model_by_path_loads_on_rank0_only_same_weights_less_memory(tmp_path, model_of_known_size):
    """A KD teacher / DPO reference / reward model given by path: rank 0 loads it, the others receive their shards
    (in the AMP dtype it is cast to). Reference: every rank loading, casting and sharding it itself (before)."""
    model_dir, size = model_of_known_size
    today = _launch(model_dir, tmp_path, "aux_today")
    aux = _launch(model_dir, tmp_path, "aux")
    expected, got = load_file(str(tmp_path / "aux_today.safetensors")), load_file(str(tmp_path / "aux.safetensors"))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    growth = {mode: [r["peak_growth"] / 2**20 for r in runs] for mode, runs in (("today", today), ("aux", aux))}
    print(f"model {size / 2**20:.0f} MiB in float32; peak memory growth per rank (MiB): {growth}")
    assert today[1]["peak_growth"] >= 0.9 * size  # every rank used to load the full float32 copy
    assert aux[1]["peak_growth"] < 0.5 * size  # now: half of the bf16 shards (size / 4) plus one tensor in flight
