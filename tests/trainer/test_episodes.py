"""Multi-turn episodes with an environment: layout, masks, sampling log-probs against a full forward, rewards,
metrics and samples (rlhf_time.experience.episodes / environments / agent_loop)."""

import functools
import json

import pytest
import torch
import torch.nn.functional as F

from rlhf_time import GRPOTrainer
from rlhf_time.constants import IGNORE_INDEX
from rlhf_time.errors import RlhfTimeError

from .helpers import Recorder
from .test_grpo import grpo_config


class AskTwice:
    """A known environment: after the first answer it asks for one more number; the second answer ends it. Reward:
    0.25 for the first turn, 1 for a second answer holding a Chinese numeral."""

    def reset(self, record):
        self.turn = 0
        return None  # the record's own prompt

    def step(self, text):
        self.turn += 1
        if self.turn == 1:
            return "把数字写成中文：5", 0.25, False
        return None, float(any(ch in text for ch in "零一二三四五六七八九十")), True


class OpensWithItsOwnQuestion(AskTwice):
    def reset(self, record):
        self.turn = 0
        return f"把数字写成中文：{len(record['prompt']) % 10}"


def episode_config(tmp_path, model_dir, **overrides):
    rollout = {"max_completion_length": 40, "environment": None, "reward_funcs": [], **overrides.pop("rollout", {})}
    return grpo_config(tmp_path, model_dir, rollout=rollout, grpo={"num_generations": 2}, temperature=1.0, top_k=0,
                       **overrides)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, half_trained):
    """On the half-trained quickstart model, which closes its turns: most episodes reach their second turn."""
    config = episode_config(tmp_path_factory.mktemp("episodes"), half_trained)
    trainer = GRPOTrainer(config, environment=AskTwice)
    trainer.model.float()
    return trainer


def sampled(trainer, seed=0, indices=(0, 1)):
    generator = torch.Generator().manual_seed(seed)
    rollout = trainer.sample_prompts(trainer.train_dataset, list(indices), num_samples=2, greedy=False,
                                     generator=generator)
    return rollout


def test_episode_layout_is_the_templates_rendering_with_only_the_sampled_tokens_trained(trainer):
    rollout = sampled(trainer)
    tokenizer, agent = trainer.tokenizer, trainer.agent
    assert rollout.episodes is not None and len(rollout.episodes) == 4
    two_turns = 0
    for row, episode in enumerate(rollout.episodes):
        ids = rollout.input_ids[row][rollout.attention_mask[row].bool()].tolist()
        # the sequence is exactly the chat template's rendering of the prompt and every turn after it
        rendered = agent.render([*episode.prompt_messages, *episode.messages])
        text = tokenizer.decode(ids, skip_special_tokens=False)
        rest = rendered[len(text):].strip()
        assert rendered.startswith(text) and rest == ("<|im_end|>" if episode.truncated else ""), (text, rendered)
        # sampled tokens: the assistant turns, each closed by its end-of-turn token; everything else is context
        completion = rollout.input_ids[row, rollout.prompt_length:]
        sampled_text = tokenizer.decode(completion[rollout.completion_mask[row]].tolist(), skip_special_tokens=False)
        assistant = [m["content"] for m in episode.messages if m["role"] == "assistant"]
        assert sampled_text.replace("<|im_end|>", "") == "".join(assistant)
        if not episode.truncated:
            assert sampled_text.count("<|im_end|>") == episode.turns
        if episode.turns == 2:
            two_turns += 1
            context = completion[~rollout.completion_mask[row] & rollout.attention_mask[row, rollout.prompt_length:].bool()]
            assert "把数字写成中文：5" in tokenizer.decode(context.tolist())
            assert episode.messages[1] == {"role": "user", "content": "把数字写成中文：5"}
    assert two_turns >= 2  # the tiny model closes its turns within the budget
    batch = trainer._training_batch(trainer.score_rollout(trainer.train_dataset, [0, 1], rollout, 2))
    labels = batch["labels"][:, rollout.prompt_length:]
    assert torch.equal(labels != IGNORE_INDEX, rollout.completion_mask)  # the environment's tokens are never trained


def test_sampling_logps_equal_a_training_forward_over_the_whole_trajectory(trainer):
    rollout = sampled(trainer, seed=3)
    assert any(e.turns == 2 for e in rollout.episodes)
    batch = trainer._training_batch(trainer.score_rollout(trainer.train_dataset, [0, 1], rollout, 2))
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               position_ids=batch["position_ids"]).logits.float()
    width = rollout.completion_mask.shape[1]
    log_probs = F.log_softmax(logits[:, -width - 1 : -1] / trainer.config.temperature, -1)
    reference = log_probs.gather(-1, batch["input_ids"][:, -width:, None]).squeeze(-1)
    mask = rollout.completion_mask
    torch.testing.assert_close(rollout.logps[mask], reference[mask], atol=1e-5, rtol=0)
    assert torch.all(rollout.logps[~mask] == 0) and torch.all(rollout.entropies[~mask] == 0)
    with torch.no_grad():
        trained = trainer.completion_logps(trainer.model, batch)  # the path the loss takes
    torch.testing.assert_close(trained[mask], reference[mask], atol=1e-5, rtol=0)


def test_the_environments_rewards_are_summed_per_episode_and_scored_as_one_more_reward(trainer):
    rollout = sampled(trainer, seed=5)
    experience = trainer.score_rollout(trainer.train_dataset, [0, 1], rollout, 2)
    assert trainer.rewards.names == ["AskTwice"]
    for row, episode in enumerate(rollout.episodes):
        second = [m["content"] for m in episode.messages if m["role"] == "assistant"][1:] if episode.turns == 2 else []
        expected = None if episode.truncated and episode.turns == 1 else 0.25 + (
            float(any(ch in second[0] for ch in "零一二三四五六七八九十")) if second and not episode.truncated else 0.0)
        assert episode.environment_reward == expected
        assert experience.per_function[0][row] == expected
        assert float(experience.rewards[row]) == (expected or 0.0)
        assert experience.texts[row] == episode.final_text


def test_an_environment_may_open_the_conversation(tmp_path, tiny_model_dir):
    trainer = GRPOTrainer(episode_config(tmp_path, tiny_model_dir), environment=OpensWithItsOwnQuestion)
    rollout = sampled(trainer)
    for row, episode in enumerate(rollout.episodes):
        asked = episode.prompt_messages[-1]["content"]
        assert asked.startswith("把数字写成中文：")
        prompt = rollout.input_ids[row, : rollout.prompt_length][rollout.attention_mask[row, : rollout.prompt_length].bool()]
        assert asked in trainer.tokenizer.decode(prompt.tolist())


def test_grpo_trains_on_episodes_and_logs_turns_and_whole_trajectories(tmp_path, tiny_model_dir):
    recorder = Recorder()
    config = episode_config(tmp_path, tiny_model_dir, max_steps=2, logging_steps=1)
    trainer = GRPOTrainer(config, environment=AskTwice)
    trainer.callbacks.append(recorder)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    first = recorder.steps[0]
    assert 1.0 <= first["train/turns"] <= 2.0 and first["train/tools/calls_per_episode"] == 0.0
    assert "train/rewards/AskTwice" in first
    samples = [json.loads(line) for line in (trainer.run_dir / "completions.jsonl").read_text().splitlines()]
    assert samples and all(s["trajectory"][0]["role"] == "assistant" for s in samples)
    assert any(len(s["trajectory"]) == 3 for s in samples)  # assistant, the environment's question, assistant


def test_a_bad_environment_is_one_line_before_any_model_loads(tmp_path, tiny_model_dir):
    config = episode_config(tmp_path, tiny_model_dir, model_name=str(tmp_path / "no-model-here"))
    with pytest.raises(RlhfTimeError, match="environment 'tests.nowhere:Env': cannot import"):
        GRPOTrainer(config.model_copy(update={"rollout": config.rollout.model_copy(
            update={"environment": "tests.nowhere:Env"})}))

    class Broken(AskTwice):
        def step(self, text):
            return "only a message"

    trainer = GRPOTrainer(episode_config(tmp_path / "b", tiny_model_dir), environment=Broken)
    with pytest.raises(RlhfTimeError, match=r"environment Broken.step returned 'only a message'; expected"):
        sampled(trainer)


def test_resume_mid_run_replays_the_same_episodes(tmp_path, tiny_model_dir):
    """A deterministic environment: the resumed run samples and answers exactly what the uninterrupted run did."""
    from .helpers import assert_resumed_mid_run_equals_uninterrupted

    settings = dict(max_steps=4, save_strategy="steps", save_steps=2, rollout={"max_completion_length": 12})
    assert_resumed_mid_run_equals_uninterrupted(lambda folder, resume: GRPOTrainer(episode_config(
        tmp_path / folder, tiny_model_dir, **({"resume_from_checkpoint": "latest"} if resume else {}), **settings),
        environment=AskTwice), "train/turns")


def test_lora_policy_trains_only_its_adapters_on_episodes(tmp_path, tiny_model_dir):
    config = episode_config(tmp_path, tiny_model_dir, use_lora=True, lora_target_modules=None, max_steps=1,
                            rollout={"max_completion_length": 12})
    trainer = GRPOTrainer(config, environment=AskTwice)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("lora_" in n for n in changed)


def test_fsdp_refuses_episodes_in_one_line_before_any_model_loads(tmp_path):
    """FSDP's ranks must run the same forwards; episodes take a different number of turns on each rank."""
    config = episode_config(tmp_path, tmp_path / "no-model-here", distributed="fsdp")
    with pytest.raises(RlhfTimeError, match="use distributed: ddp"):
        GRPOTrainer(config, environment=AskTwice)


def test_episodes_sampled_together_split_into_micro_batches_with_their_turn_masks(trainer):
    """rollout.sample_together with multi-turn episodes: each micro-batch keeps its own rows, episodes and masks,
    and the sampled tokens' log-probs still equal the training forward's over the whole trajectory."""
    from rlhf_time.experience.experience import collect

    generators = [torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)]
    sample = functools.partial(trainer.sample_prompts, trainer.train_dataset)
    experiences = collect(sample, trainer.rewards, trainer.tokenizer, trainer.train_dataset, [[0, 1], [2, 3]],
                          group_size=2, generators=generators, together=True)
    whole = sample([0, 1, 2, 3], num_samples=2, greedy=False, generator=torch.Generator().manual_seed(3))
    for part, experience in enumerate(experiences):
        rollout = experience.rollout
        assert [e.final_text for e in rollout.episodes] == [e.final_text for e in whole.episodes[4 * part: 4 * part + 4]]
        batch = experience.batch()
        recomputed = trainer.completion_logps(trainer.train_model, batch).detach()
        torch.testing.assert_close(recomputed * batch["loss_mask"], batch["old_logps"], rtol=0, atol=1e-5)
        assert (batch["labels"] != -100).sum() == batch["loss_mask"].sum()  # context tokens stay untrained
