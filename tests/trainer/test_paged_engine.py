"""rollout.engine transformers_paged (transformers' continuous batching): log-probs equal a fresh forward's (each
row alone), the sampler's layout and stopping conventions, greedy equals the built-in engine, same seed same
samples, the attention implementation and training mode restored (a GRPO step then equals an untouched eager
model's), a tiny GRPO run end to end. Exact resume."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from rlhf_time import GRPOTrainer, TrainingConfig
from rlhf_time.config_errors import ConfigError
from rlhf_time.experience.paged_engine import TransformersPagedEngine
from rlhf_time.experience.sampler import KVCacheEngine, SamplingParams

from .helpers import assert_resumed_mid_run_equals_uninterrupted, Recorder, weights
from .test_grpo import grpo_config

PROMPTS = ["把数字写成中文：407", "你好", "The quick brown fox jumps over the lazy dog. 把数字写成中文：12"]
PAGED = {"engine": "transformers_paged"}


@pytest.fixture(scope="module")
def model_and_prompts(tiny_model_dir, tiny_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="eager")
    prompts = [tiny_tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=True,
                                                  add_generation_prompt=True) for p in PROMPTS]
    return model, [list(p["input_ids"] if hasattr(p, "keys") else p) for p in prompts]


def frequent_stops(model, prompts, count=8):
    """Stop tokens the model often draws (its most likely next tokens after the prompts), so rows stop early."""
    with torch.no_grad():
        logits = torch.stack([model(input_ids=torch.tensor([p])).logits[0, -1] for p in prompts]).mean(0)
    return tuple(logits.topk(count).indices.tolist())


def test_logps_equal_a_fresh_forward_of_each_row_and_rows_stop_as_the_sampler_lays_them_out(model_and_prompts,
                                                                                           tiny_tokenizer):
    model, prompts = model_and_prompts
    temperature, top_k, group, length = 0.7, 20, 4, 10
    stops = frequent_stops(model, prompts)
    params = SamplingParams(max_new_tokens=length, pad_token_id=tiny_tokenizer.pad_token_id, stop_token_ids=stops,
                            temperature=temperature, top_k=top_k)
    model.train()
    rollout = TransformersPagedEngine(model).sample(prompts, params, num_samples=group,
                                                    generator=torch.Generator().manual_seed(0))
    assert model.training and model.config._attn_implementation == "eager"
    model.eval()

    lengths = rollout.completion_lengths.tolist()
    assert rollout.input_ids.shape == (len(prompts) * group, rollout.prompt_length + max(lengths))
    assert any(n < length for n in lengths) and all(1 <= n <= length for n in lengths)
    for row, (ids, mask, completion_mask) in enumerate(zip(rollout.input_ids, rollout.attention_mask,
                                                           rollout.completion_mask)):
        prompt = prompts[row // group]  # rows i*G .. i*G+G-1 belong to prompt i
        pad = rollout.prompt_length - len(prompt)
        assert ids[pad: rollout.prompt_length].tolist() == prompt and mask[:pad].sum() == 0
        n = lengths[row]
        completion = ids[rollout.prompt_length:].tolist()
        assert completion_mask.tolist() == [True] * n + [False] * (len(completion) - n)
        assert completion[n:] == [tiny_tokenizer.pad_token_id] * (len(completion) - n)
        stopped = [t in stops for t in completion[:n]]
        # a stop token ends the row and is kept as its last token; a row without one ran to max_new_tokens
        assert stopped == [False] * (n - 1) + [stopped[-1]] and stopped[-1] != bool(rollout.truncated[row])
        assert stopped[-1] or n == length

        sequence = torch.tensor([prompt + completion[:n]])  # the row alone, unpadded: the independent reference
        with torch.no_grad():
            log_probs = F.log_softmax(model(input_ids=sequence).logits[0, len(prompt) - 1: -1].float() / temperature, -1)
        expected = log_probs.gather(-1, sequence[0, len(prompt):, None]).squeeze(-1)
        torch.testing.assert_close(rollout.logps[row, :n], expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(rollout.entropies[row, :n], -(log_probs.exp() * log_probs).sum(-1), rtol=0, atol=1e-5)
        assert rollout.logps[row, n:].abs().sum() == 0 and rollout.entropies[row, n:].abs().sum() == 0
        # drawn under top-k: every sampled token is among the k most likely
        ranks = (log_probs > expected[:, None]).sum(-1)
        assert int(ranks.max()) < top_k


def test_greedy_equals_the_built_in_engine(model_and_prompts, tiny_tokenizer):
    model, prompts = model_and_prompts
    params = SamplingParams(max_new_tokens=8, pad_token_id=tiny_tokenizer.pad_token_id,
                            stop_token_ids=frequent_stops(model, prompts, 3), do_sample=False)
    paged = TransformersPagedEngine(model).sample(prompts, params, num_samples=2)
    built_in = KVCacheEngine(model).sample(prompts, params, num_samples=2)
    assert paged.prompt_length == built_in.prompt_length
    for name in ("input_ids", "attention_mask", "completion_mask", "truncated"):
        assert torch.equal(getattr(paged, name), getattr(built_in, name)), name
    torch.testing.assert_close(paged.logps, built_in.logps, rtol=0, atol=1e-5)


def test_same_seed_same_completions_and_the_global_rng_is_left_alone(model_and_prompts, tiny_tokenizer):
    model, prompts = model_and_prompts
    params = SamplingParams(max_new_tokens=6, pad_token_id=tiny_tokenizer.pad_token_id,
                            stop_token_ids=(tiny_tokenizer.eos_token_id,), temperature=1.0, top_p=0.95)
    engine = TransformersPagedEngine(model)
    rng_before = torch.get_rng_state()
    first, again, other = (engine.sample(prompts, params, num_samples=3, generator=torch.Generator().manual_seed(seed))
                           for seed in (5, 5, 6))
    assert torch.equal(torch.get_rng_state(), rng_before)  # transformers reseeds it; the engine restores it
    assert torch.equal(first.input_ids, again.input_ids) and torch.equal(first.logps, again.logps)
    assert not torch.equal(first.input_ids, other.input_ids)
    # without a generator the draws come from the global RNG, so two calls differ
    assert not torch.equal(engine.sample(prompts, params, num_samples=3).input_ids,
                           engine.sample(prompts, params, num_samples=3).input_ids)


def test_a_grpo_step_after_a_paged_rollout_equals_an_untouched_eager_models(tmp_path, tiny_model_dir):
    trainer = GRPOTrainer(grpo_config(tmp_path, tiny_model_dir, attn_implementation="eager", rollout=PAGED,
                                      temperature=0.8))
    assert isinstance(trainer.sampling_engine, TransformersPagedEngine)
    trainer.model.train()  # as in the loop
    switches = []
    switch = trainer.model.set_attn_implementation
    trainer.model.set_attn_implementation = lambda name: (switches.append(name), switch(name))[1]
    batch = trainer.prepare_step([trainer.collate([0, 1], trainer.train_dataset)], trainer.train_dataset)[0]
    assert switches == ["paged|eager", "eager"]  # paged while sampling, eager again for training
    assert trainer.model.config._attn_implementation == "eager" and trainer.model.training

    # advantages drawn here: the untrained model's rewards are mostly flat, which would leave no gradient to compare
    batch = {**batch, "advantages": torch.randn(batch["advantages"].shape, generator=torch.Generator().manual_seed(0))}
    untouched = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                     attn_implementation="eager").train()
    results = []
    for model in (trainer.train_model, untouched):
        loss, _ = trainer.compute_loss(model, batch, trainer.count_items(batch))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss, grads), (expected_loss, expected_grads) = results
    assert loss.item() != 0.0 and loss.item() == pytest.approx(expected_loss.item(), rel=1e-6, abs=1e-7)
    assert grads.keys() == expected_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_grpo_trains_end_to_end_with_the_paged_engine(tmp_path, tiny_model_dir):
    trainer = GRPOTrainer(grpo_config(tmp_path, tiny_model_dir, rollout=PAGED, eval_strategy="steps", eval_steps=2))
    recorder = Recorder()
    trainer.callbacks.append(recorder)
    before = weights(trainer.model)
    results = trainer.train()
    assert len(recorder.steps) == 2 and results["best_metric"] is not None  # eval: greedy through the same engine
    assert all(1 <= step["train/completions/max_length"] <= 6 for step in recorder.steps)
    assert all(abs(step["train/sampler_kl"]) < 1e-6 for step in recorder.steps)  # recomputed: no sampler gap
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def test_resume_mid_run_is_exact_with_the_paged_engine(tmp_path, tiny_model_dir):
    settings = dict(max_steps=4, save_strategy="steps", save_steps=2, temperature=0.8, rollout=PAGED)
    assert_resumed_mid_run_equals_uninterrupted(lambda folder, resume: GRPOTrainer(grpo_config(
        tmp_path / folder, tiny_model_dir, **({"resume_from_checkpoint": "latest"} if resume else {}), **settings)),
        "train/reward")


def test_the_engine_is_validated_and_refused_under_fsdp():
    with pytest.raises(ConfigError, match="kv_cache.*transformers_paged"):
        TrainingConfig(stage="grpo", rollout={"engine": "vllm"})
    with pytest.raises(ConfigError, match="transformers_paged cannot sample a sharded"):
        TrainingConfig(stage="grpo", rollout=PAGED, distributed="fsdp")
    assert TrainingConfig(stage="grpo", distributed="fsdp").rollout.engine == "kv_cache"
