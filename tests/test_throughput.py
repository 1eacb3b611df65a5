"""Throughput accounting: the same examples count the same tokens and FLOPs packed or padded; model FLOPs against a
count written out from the model's config (tied and untied heads, GRPO's shared prompts); an honest CPU peak."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from rlhf_time import SFTrainer
from rlhf_time.data import PackingCollator, PaddingCollator
from rlhf_time.runtime import throughput
from rlhf_time.runtime.throughput import ThroughputMeter, example_lengths

from tests.trainer.helpers import Recorder, tiny_config

SHAPE = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, head_dim=8)


def _examples(lengths):
    return [{"input_ids": list(range(1, n + 1)), "labels": [-100] * (n // 2) + list(range(n // 2 + 1, n + 1))}
            for n in lengths]


def _model(tied: bool):
    return Qwen3ForCausalLM(Qwen3Config(**SHAPE, tie_word_embeddings=tied))


def hand_count_forward(tokens: float, projected: float, attention_pairs: float) -> float:
    """One forward pass of the SHAPE model, written out from its config: every matrix product's multiply-adds x 2."""
    h, i, layers = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["num_hidden_layers"]
    q_width = SHAPE["num_attention_heads"] * SHAPE["head_dim"]
    kv_width = SHAPE["num_key_value_heads"] * SHAPE["head_dim"]
    per_layer = h * q_width + 2 * h * kv_width + q_width * h + 3 * h * i  # q, k, v, o projections; gate, up, down
    head = h * SHAPE["vocab_size"]  # the LM head, tied or not: V x H multiply-adds per projected position
    scores_and_values = 2 * q_width * layers  # QK^T and AV: q_width multiply-adds each, per query-key pair, per layer
    return 2 * (layers * per_layer * tokens + head * projected + scores_and_values * attention_pairs)


def test_example_lengths_of_padded_and_packed_batches_agree():
    examples = _examples([5, 3, 8, 2])
    padded = PaddingCollator(pad_token_id=0)(examples)
    packed = PackingCollator(pad_token_id=0, row_length=10)(examples)
    assert sorted(example_lengths(padded).tolist()) == sorted(example_lengths(packed).tolist()) == [2, 3, 5, 8]


@pytest.mark.parametrize("tied", [True, False], ids=["tied_head", "untied_head"])
def test_meter_flops_equal_a_hand_count_padded_or_packed(tied, monkeypatch):
    monkeypatch.setattr(throughput, "device_peak_flops", lambda device: 1e9)
    model = _model(tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    lengths = [5, 3, 8, 2]
    targets = sum(n - n // 2 for n in lengths)  # labelled positions: the only ones projected to the vocabulary
    # training = forward + backward = 3 forwards; attention over the causal half, n^2 / 2 pairs per example
    flops = 3 * hand_count_forward(tokens=sum(lengths), projected=targets,
                                   attention_pairs=sum(n * n / 2 for n in lengths))
    rates = {}
    for name, collator in (("padded", PaddingCollator(pad_token_id=0)),
                           ("packed", PackingCollator(pad_token_id=0, row_length=10))):
        meter = ThroughputMeter(model, torch.device("cpu"))
        meter.add_batch(collator(_examples(lengths)))
        rates[name] = meter.end_step(seconds=2.0, world_size=1)
    for name in rates:
        assert rates[name]["train/tokens_per_sec"] == 18 / 2.0
        assert rates[name]["train/target_tokens_per_sec"] == targets / 2.0
        assert rates[name]["train/mfu"] == pytest.approx(flops / 2.0 / 1e9, rel=1e-12)
    assert rates["padded"]["train/padding_fraction"] == pytest.approx(1 - 18 / 32)  # 4 rows x 8
    assert rates["packed"]["train/padding_fraction"] == pytest.approx(1 - 18 / 20)  # 2 rows x 10 (8+2, 5+3)


def _grpo_batch(prompt_lengths, completion_lengths, group):
    """Rows i*G .. i*G+G-1 share prompt i: prompts left-padded to 4 columns, completions right-padded to 3."""
    rows = len(completion_lengths)
    mask = torch.zeros(rows, 7, dtype=torch.long)
    loss_mask = torch.zeros(rows, 3, dtype=torch.bool)
    for row, c in enumerate(completion_lengths):
        mask[row, 4 - prompt_lengths[row // group] : 4] = 1
        mask[row, 4 : 4 + c] = 1
        loss_mask[row, :c] = True
    labels = torch.full((rows, 7), -100)
    labels[:, 4:][loss_mask] = 7
    return {"input_ids": torch.ones(rows, 7, dtype=torch.long), "attention_mask": mask, "labels": labels,
            "loss_mask": loss_mask, "group_size": torch.tensor(group)}


def test_grpo_counts_each_shared_prompt_once(monkeypatch):
    monkeypatch.setattr(throughput, "device_peak_flops", lambda device: 1.0)
    prompts, completions, group = [3, 4], [3, 1, 2, 3], 2
    batch = _grpo_batch(prompts, completions, group)
    meter = ThroughputMeter(_model(tied=True), torch.device("cpu"))
    shared = [prompts[row // group] for row in range(len(completions))]
    # the prompt pass once per prompt (p tokens, p^2/2 pairs); each completion: c tokens, p*c + c^2/2 pairs
    expected = hand_count_forward(
        tokens=sum(prompts) + sum(completions), projected=sum(completions),
        attention_pairs=sum(p * p / 2 for p in prompts) + sum(p * c + c * c / 2 for p, c in zip(shared, completions)))
    assert meter.forward_flops(batch) == pytest.approx(expected, rel=1e-12)
    # without sharing, every row runs its whole sequence: the prompts' work G times instead of once
    unshared = {k: v for k, v in batch.items() if k != "group_size"}
    saved = (group - 1) * hand_count_forward(tokens=sum(prompts), projected=0,
                                             attention_pairs=sum(p * p / 2 for p in prompts))
    assert meter.forward_flops(unshared) - meter.forward_flops(batch) == pytest.approx(saved, rel=1e-12)


def test_cpu_peak_is_the_best_one_thread_rate_times_the_threads(monkeypatch):
    rates = {torch.float32: 1e9, torch.bfloat16: 3e9}  # per 1024-wide product; smaller ones slower
    seen_threads = []

    def fake_rate(device, size, dtype):
        seen_threads.append(torch.get_num_threads())
        return rates[dtype] * size / 1024

    monkeypatch.setattr(throughput, "matmul_rate", fake_rate)
    throughput.cpu_peak_flops.cache_clear()
    before = torch.get_num_threads()
    try:
        assert throughput.cpu_peak_flops(3) == 3 * 3e9
    finally:
        throughput.cpu_peak_flops.cache_clear()  # later tests measure the real CPU
    assert set(seen_threads) == {1} and torch.get_num_threads() == before


def test_mfu_of_a_real_tiny_cpu_run_is_at_most_one(tmp_path, tiny_model_dir):
    recorder = Recorder()
    for use_amp in (False, True):  # float32 and bf16 autocast: the peak is the faster of the two dtypes
        trainer = SFTrainer(tiny_config(tmp_path, tiny_model_dir, experiment_name=f"amp_{use_amp}", max_train_samples=32,
                                        max_seq_length=128, use_amp=use_amp, device="cpu"))
        trainer.callbacks.append(recorder)
        summary = trainer.train()
        assert 0 < summary["mfu"] <= 1
    assert len(recorder.steps) == 8 and all(0 < step["train/mfu"] <= 1 for step in recorder.steps)


def test_cpu_peak_memory_is_the_programs_own_not_its_parents():
    """A process started from a large one reports its own peak: getrusage's ru_maxrss would carry the parent's
    (Linux keeps the peak from before exec), which made bench children and pytest-launched runs read high."""
    import subprocess
    import sys

    ballast = bytearray(1 << 30)
    ballast[:: 4096] = b"\x01" * len(ballast[:: 4096])  # touch every page: 1 GiB resident in this process
    probe = ("import torch; from rlhf_time.runtime.throughput import peak_memory_bytes; "
             "print(peak_memory_bytes(torch.device('cpu')))")
    own_peak = float(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout)
    assert len(ballast) == 1 << 30 and own_peak < 0.8 * 2**30
