"""One generation path: predict / chat, on-policy KD and GRPO all sample through the trainer's sampling engine
(rlhf_time.experience.sampler), and none of them through transformers' generate."""

import pytest
from transformers import GenerationMixin

from rlhf_time import GRPOTrainer, KDTrainer, SFTrainer
from rlhf_time.experience.paged_engine import TransformersPagedEngine
from rlhf_time.experience.sampler import KVCacheEngine, sample

from .helpers import merged, tiny_config
from .test_grpo import grpo_config


@pytest.fixture
def sampled(monkeypatch):
    """Every call of an engine's sample (either engine), as (number of prompts, num_samples, do_sample); generate
    refused."""
    calls = []

    def recording(original):
        def sample(self, prompts, params, *, num_samples=1, generator=None):
            calls.append((len(prompts), num_samples, params.do_sample))
            return original(self, prompts, params, num_samples=num_samples, generator=generator)
        return sample

    def refuse(*args, **kwargs):
        raise AssertionError("transformers' generate was called: there is one sampler")

    for engine in (KVCacheEngine, TransformersPagedEngine):
        monkeypatch.setattr(engine, "sample", recording(engine.sample))
    monkeypatch.setattr(GenerationMixin, "generate", refuse)
    return calls


def test_predict_and_chat_sample_through_the_engine(tmp_path, tiny_model_dir, sampled):
    trainer = SFTrainer(tiny_config(tmp_path, tiny_model_dir))
    answers = trainer.predict(["1+1", "2+2", "3+3"], max_new_tokens=5, batch_size=2)
    reply = trainer.chat([{"role": "user", "content": "hi"}], max_new_tokens=4, do_sample=True)
    assert len(answers) == 3 and isinstance(reply, str)
    assert sampled == [(2, 1, False), (1, 1, False), (1, 1, True)]  # two batches greedy, then one sampled
    # Greedy predict is the argmax continuation written out with the sampling function itself.
    prompt = trainer.tokenizer(trainer.inference.encoder.generation_prompt([{"role": "user", "content": "1+1"}]),
                               add_special_tokens=False).input_ids
    rollout = sample(trainer.model, [prompt], max_new_tokens=5, pad_token_id=trainer.tokenizer.pad_token_id,
                     stop_token_ids=trainer.inference.stop_token_ids(), do_sample=False)
    expected = trainer.tokenizer.decode(rollout.completion_lists()[0], skip_special_tokens=True).strip()
    assert answers[0] == expected


def test_on_policy_kd_samples_the_student_through_the_engine(tmp_path, tiny_model_dir, sampled):
    config = tiny_config(tmp_path, tiny_model_dir, **merged(dict(stage="kd", max_steps=1, gradient_accumulation_steps=2,
                                                                 kd={"teacher_model": str(tiny_model_dir),
                                                                     "on_policy_ratio": 1.0}), {}))
    trainer = KDTrainer(config)
    assert trainer.sampling_engine.model is trainer.model
    trainer.train()
    assert [(n, k, do_sample) for n, k, do_sample in sampled] == [(config.batch_size, 1, True)] * 2


def test_grpo_samples_through_the_engine(tmp_path, tiny_model_dir, sampled):
    trainer = GRPOTrainer(grpo_config(tmp_path, tiny_model_dir, max_steps=1, eval_file=None))
    trainer.train()
    group = trainer.config.grpo.num_generations
    assert sampled == [(trainer.config.batch_size, group, True)] * trainer.config.gradient_accumulation_steps


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_sample_together_draws_the_whole_step_in_one_call_and_trains_on_each_micro_batch(tmp_path, tiny_model_dir,
                                                                                          sampled, stage):
    """rollout.sample_together: one engine call for the step's micro-batches; each micro-batch then carries only
    its own rows and columns, and its sampling log-probs still equal the training forward's."""
    import torch

    from rlhf_time import PPOTrainer

    from .test_ppo import ppo_config

    overrides = dict(max_steps=1, eval_file=None, gradient_accumulation_steps=3, max_train_samples=6,
                     rollout={"sample_together": True, "max_completion_length": 10})
    trainer = (GRPOTrainer(grpo_config(tmp_path, tiny_model_dir, **overrides)) if stage == "grpo"
               else PPOTrainer(ppo_config(tmp_path, tiny_model_dir, **overrides)))
    group = trainer.config.grpo.num_generations if stage == "grpo" else 1
    plan = trainer.epoch_plan(0)[:3]
    experiences = trainer.collect_experience([trainer.collate(b, trainer.train_dataset) for b in plan],
                                             trainer.train_dataset, group)
    assert sampled == [(3 * trainer.config.batch_size, group, True)]
    for experience, indices in zip(experiences, plan):
        rollout = experience.rollout
        assert experience.indices == list(indices) and rollout.input_ids.shape[0] == len(indices) * group
        assert rollout.attention_mask[:, 0].any() and rollout.attention_mask[:, -1].any()  # no column all padding
        batch = experience.batch()
        recomputed = trainer.completion_logps(trainer.train_model, {**batch, "group_size": torch.tensor(group)})
        torch.testing.assert_close(recomputed.detach() * batch["loss_mask"], batch["old_logps"], rtol=0, atol=1e-5)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    assert len(sampled) == 2  # the step sampled once more, all micro-batches together
