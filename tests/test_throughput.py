"""Throughput accounting: the same examples count the same tokens and FLOPs packed or padded; MFU by formula."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from rlhf_time.data import PackingCollator, PaddingCollator
from rlhf_time.runtime import throughput
from rlhf_time.runtime.throughput import ThroughputMeter, example_lengths


def _examples(lengths):
    return [{"input_ids": list(range(1, n + 1)), "labels": [-100] * (n // 2) + list(range(n // 2 + 1, n + 1))}
            for n in lengths]


@pytest.fixture
def model():
    config = Qwen3Config(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    return Qwen3ForCausalLM(config)


def test_example_lengths_of_padded_and_packed_batches_agree():
    examples = _examples([5, 3, 8, 2])
    padded = PaddingCollator(pad_token_id=0)(examples)
    packed = PackingCollator(pad_token_id=0, row_length=10)(examples)
    assert sorted(example_lengths(padded).tolist()) == sorted(example_lengths(packed).tolist()) == [2, 3, 5, 8]


def test_meter_counts_tokens_padding_and_mfu_by_formula(model, monkeypatch):
    monkeypatch.setattr(throughput, "device_peak_flops", lambda device: 1e9)
    lengths = [5, 3, 8, 2]
    rates = {}
    for name, collator in (("padded", PaddingCollator(pad_token_id=0)),
                           ("packed", PackingCollator(pad_token_id=0, row_length=10))):
        meter = ThroughputMeter(model, torch.device("cpu"))
        meter.add_batch(collator(_examples(lengths)))
        rates[name] = meter.end_step(seconds=2.0, world_size=1)
    non_embedding = sum(p.numel() for p in model.parameters()) - 50 * 16
    flops = 6 * non_embedding * 18 + 6 * 2 * (2 * 8) * sum(n * n for n in lengths)  # written out: 6N·T + 6·L·d·Σn²
    targets = sum(n - n // 2 for n in lengths)
    for name in rates:
        assert rates[name]["train/tokens_per_sec"] == 18 / 2.0
        assert rates[name]["train/target_tokens_per_sec"] == targets / 2.0
        assert rates[name]["train/mfu"] == pytest.approx(flops / 2.0 / 1e9)
    assert rates["padded"]["train/padding_fraction"] == pytest.approx(1 - 18 / 32)  # 4 rows x 8
    assert rates["packed"]["train/padding_fraction"] == pytest.approx(1 - 18 / 20)  # 2 rows x 10 (8+2, 5+3)
