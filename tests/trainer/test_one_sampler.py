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
