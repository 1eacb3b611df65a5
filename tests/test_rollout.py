"""Rollouts: log-probs of the sampled tokens equal a fresh forward's (each row alone, unpadded), stopping and
truncation flags, greedy equals transformers' generate, top-k / top-p filters by hand."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from rlhf_time.experience.sampler import filter_logits, sample

PROMPTS = ["把数字写成中文：407", "你好", "The quick brown fox jumps over the lazy dog. 把数字写成中文：12"]


@pytest.fixture(scope="module")
def model_and_prompts(tiny_model_dir, tiny_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    prompts = [tiny_tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=True,
                                                  add_generation_prompt=True) for p in PROMPTS]
    prompts = [p["input_ids"] if isinstance(p, dict) or hasattr(p, "keys") else p for p in prompts]
    return model, prompts


def frequent_tokens(model, prompts, count):
    """The most likely first tokens of the first prompt: as stop tokens they make some rows stop early."""
    with torch.no_grad():
        logits = model(torch.tensor([prompts[0]])).logits[0, -1]
    return logits.topk(count).indices.tolist()


def unpadded_logps(model, prompt, completion, temperature):
    """log softmax(logits / T) of each completion token, from one forward over this row alone (no padding)."""
    ids = torch.tensor([list(prompt) + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float() / temperature
    return F.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def test_sampled_logps_equal_a_fresh_forward_and_rows_stop(model_and_prompts, tiny_tokenizer):
    model, prompts = model_and_prompts
    stops = frequent_tokens(model, prompts, 6)
    generator = torch.Generator().manual_seed(0)
    model.train()  # sampling runs in eval mode and gives the mode back
    rollout = sample(model, prompts, num_samples=4, max_new_tokens=10, pad_token_id=tiny_tokenizer.pad_token_id,
                     stop_token_ids=stops, temperature=0.7, top_k=50, top_p=0.95, generator=generator)
    assert model.training
    model.eval()
    n = len(prompts) * 4
    assert rollout.input_ids.shape[0] == n and rollout.prompt_length == max(map(len, prompts))
    lengths = rollout.completion_lengths.tolist()
    assert min(lengths) < 10 and rollout.truncated.any()  # both early stops and truncated rows occur
    completions = rollout.completion_lists()
    for row, completion in enumerate(completions):
        prompt = prompts[row // 4]
        # the prompt sits left-padded right before the completion; the completion stops at its first stop token
        assert rollout.input_ids[row, : rollout.prompt_length].tolist()[-len(prompt):] == prompt
        assert not any(t in stops for t in completion[:-1])
        assert rollout.truncated[row] == (completion[-1] not in stops)
        if rollout.truncated[row]:
            assert len(completion) == 10
        expected = unpadded_logps(model, prompt, completion, 0.7)
        got = rollout.logps[row, : len(completion)]
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        assert torch.all(rollout.logps[row, len(completion):] == 0)
    # The batched training forward on the rollout's own layout gives the same log-probs.
    with torch.no_grad():
        logits = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                       position_ids=rollout.position_ids).logits[:, rollout.prompt_length - 1 : -1].float() / 0.7
    batched = F.log_softmax(logits, -1).gather(-1, rollout.completion_ids[..., None]).squeeze(-1)
    torch.testing.assert_close(batched * rollout.completion_mask, rollout.logps, rtol=0, atol=1e-5)
    entropies = rollout.entropies[rollout.completion_mask]
    assert (entropies > 0).all() and (entropies <= math.log(len(tiny_tokenizer))).all()


def test_same_generator_seed_same_samples_and_different_seeds_differ(model_and_prompts, tiny_tokenizer):
    model, prompts = model_and_prompts
    settings = dict(num_samples=3, max_new_tokens=6, pad_token_id=tiny_tokenizer.pad_token_id,
                    stop_token_ids=[tiny_tokenizer.eos_token_id])
    first = sample(model, prompts, generator=torch.Generator().manual_seed(5), **settings)
    again = sample(model, prompts, generator=torch.Generator().manual_seed(5), **settings)
    other = sample(model, prompts, generator=torch.Generator().manual_seed(6), **settings)
    assert torch.equal(first.input_ids, again.input_ids)
    assert not torch.equal(first.input_ids, other.input_ids)


@pytest.mark.parametrize("stop_early", [True, False])
def test_greedy_equals_transformers_generate(model_and_prompts, tiny_tokenizer, stop_early):
    model, prompts = model_and_prompts
    stops = frequent_tokens(model, prompts, 40)
    rollout = sample(model, prompts, max_new_tokens=8, pad_token_id=tiny_tokenizer.pad_token_id,
                     stop_token_ids=stops, do_sample=False, stop_early=stop_early)
    for prompt, completion in zip(prompts, rollout.completion_lists()):
        generated = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=stops,
                                   pad_token_id=tiny_tokenizer.pad_token_id)[0, len(prompt):].tolist()
        assert completion == generated


def test_top_k_and_top_p_filters_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    inf = -math.inf
    kept = lambda filtered: (filtered > inf)[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [True, True, False, False, False]
    assert kept(filter_logits(logits, top_p=0.7)) == [True, True, False, False, False]  # 0.5 + 0.2 reaches 0.7
    assert kept(filter_logits(logits, top_p=0.71)) == [True, True, True, False, False]
    assert kept(filter_logits(logits, top_p=0.1)) == [True, False, False, False, False]  # the top token stays
    shuffled = logits[:, [3, 0, 4, 2, 1]]
    assert kept(filter_logits(shuffled, top_p=0.7)) == [False, True, False, False, True]
    assert kept(filter_logits(shuffled, top_k=3, top_p=1.0)) == [False, True, False, True, True]

