"""Rollouts with tools: the calls of each turn are run, their results enter the context as tool turns, the episode
goes on; failures are data; only sampled tokens are trained; sampling log-probs equal a full forward over the whole
trajectory; reward functions see trajectories and call counts; the metrics count calls and errors."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rlhf_time import GRPOTrainer
from rlhf_time.constants import IGNORE_INDEX

from .grpo_helpers import teacher_forced_rollout
from .helpers import Recorder, merged, tiny_config
from .test_grpo import grpo_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CALLS = [  # the first turn of each of the 4 episodes (2 prompts x 2), forced
    '<tool_call>\n{"name": "multiply", "arguments": {"a": 3, "b": 4}}\n</tool_call>',
    '<tool_call>\n{"name": "divide", "arguments": {"a": 3}}\n</tool_call>',  # not a tool of the run
    '<tool_call>\n{"name": "multiply", "arguments": {"a": 3, "b": }}\n</tool_call>',  # not JSON
    "12",  # no call: the episode ends after this turn
]


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: The first factor.
        b: The second factor.
    """
    return a * b


def seen_by_reward(prompts, completions, trajectories, tool_calls, answer, **_):
    seen_by_reward.calls.append((completions, trajectories, tool_calls, answer))
    return [float(c.strip() == a) for c, a in zip(completions, answer)]


seen_by_reward.calls = []


def tool_config(tmp_path, model_dir, **overrides):
    return grpo_config(tmp_path, model_dir, train_file=str(EXAMPLES / "data" / "agent_prompts.jsonl"),
                       eval_file=str(EXAMPLES / "data" / "agent_eval.jsonl"), max_seq_length=512,
                       rollout={"max_completion_length": 160, "max_prompt_length": 1024,
                                "reward_funcs": ["tests.trainer.test_tool_rollouts:seen_by_reward"]},
                       grpo={"num_generations": 2}, temperature=1.0, top_k=0, **overrides)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, tiny_model_dir):
    trainer = GRPOTrainer(tool_config(tmp_path_factory.mktemp("tools"), tiny_model_dir), tools=[multiply])
    trainer.model.float()
    return trainer


def forced_first_turn(trainer, calls=CALLS):
    """draw() for AgentLoop.sample: the first turn of every episode is one of `calls` (log-probs by a full forward,
    as sampling computes them); later turns are sampled by the trainer's engine."""
    tokenizer, state = trainer.tokenizer, {"first": True}

    def draw(prompt_ids, *, num_samples, max_new_tokens):
        if state.pop("first", False):
            prompts = [ids for ids in prompt_ids for _ in range(num_samples)]
            completions = [tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
                           for text in calls]
            return teacher_forced_rollout(trainer.model, prompts, completions, pad_token_id=tokenizer.pad_token_id)
        params = trainer.sampling_params(greedy=False)
        from dataclasses import replace

        return trainer.sampling_engine.sample(prompt_ids, replace(params, max_new_tokens=max_new_tokens),
                                              num_samples=num_samples, generator=torch.Generator().manual_seed(1))

    return draw


def episodes_of(trainer):
    return trainer.agent.sample(forced_first_turn(trainer), trainer.train_dataset, [0, 1], num_samples=2,
                                max_new_tokens=160, pad_token_id=trainer.tokenizer.pad_token_id)


def test_calls_run_and_their_results_and_failures_are_tool_turns(trainer):
    rollout = episodes_of(trainer)
    ok, unknown, not_json, plain = rollout.episodes
    assert ok.messages[0]["tool_calls"] == [{"type": "function", "function": {"name": "multiply",
                                                                            "arguments": {"a": 3, "b": 4}}}]
    assert ok.messages[1] == {"role": "tool", "content": "12", "name": "multiply"}
    assert unknown.messages[1]["content"].startswith("error: unknown tool 'divide'")
    assert not_json.messages[1]["content"].startswith("error: the call is not JSON")
    assert [e.tool_calls for e in rollout.episodes] == [1, 1, 1, 0]
    assert [e.failed_tool_calls for e in rollout.episodes] == [0, 1, 1, 0]
    assert plain.turns == 1 and plain.messages == [{"role": "assistant", "content": "12"}]
    for episode in (ok, unknown, not_json):  # each went on to a second turn (or ran out of tokens in it)
        assert episode.turns == 2 and episode.messages[2]["role"] == "assistant"


def test_the_sequence_is_the_training_layout_and_only_sampled_tokens_are_trained(trainer):
    rollout = episodes_of(trainer)
    tokenizer = trainer.tokenizer
    for row, episode in enumerate(rollout.episodes):
        ids = rollout.input_ids[row][rollout.attention_mask[row].bool()].tolist()
        rendered = trainer.agent.render([*episode.prompt_messages, *episode.messages], tools=episode.tools)
        if episode.truncated:  # up to the turn the budget cut (a random model's bytes may not decode alone)
            mask = rollout.completion_mask[row].tolist()
            last_turn = max(i for i in range(len(mask)) if mask[i] and (i == 0 or not mask[i - 1]))
            prompt_tokens = int(rollout.attention_mask[row, : rollout.prompt_length].sum())
            assert rendered.startswith(tokenizer.decode(ids[: prompt_tokens + last_turn]))
        else:
            assert rendered.rstrip("\n") == tokenizer.decode(ids, skip_special_tokens=False)
        if episode.tool_calls:  # the tool result is context: in the sequence, not among the sampled tokens
            completion = rollout.input_ids[row, rollout.prompt_length:]
            context = completion[~rollout.completion_mask[row] & rollout.attention_mask[row, rollout.prompt_length:].bool()]
            assert f"<tool_response>\n{episode.messages[1]['content']}\n</tool_response>" in tokenizer.decode(context)
    batch = trainer._training_batch(trainer.score_rollout(trainer.train_dataset, [0, 1], rollout, 2))
    assert torch.equal(batch["labels"][:, rollout.prompt_length:] != IGNORE_INDEX, rollout.completion_mask)
    assert torch.equal(batch["loss_mask"], rollout.completion_mask)


def test_sampling_logps_equal_a_full_forward_over_the_multi_turn_trajectory(trainer):
    rollout = episodes_of(trainer)
    batch = trainer._training_batch(trainer.score_rollout(trainer.train_dataset, [0, 1], rollout, 2))
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               position_ids=batch["position_ids"]).logits.float()
        trained = trainer.completion_logps(trainer.model, batch)
    width = rollout.completion_mask.shape[1]
    reference = F.log_softmax(logits[:, -width - 1 : -1], -1).gather(-1, batch["input_ids"][:, -width:, None]).squeeze(-1)
    mask = rollout.completion_mask
    second_turns = mask.clone()
    for row, episode in enumerate(rollout.episodes):  # the sampled turn after the tool result
        first = len(trainer.tokenizer(CALLS[row], add_special_tokens=False).input_ids) + 1
        second_turns[row, :first] = False
    assert second_turns.sum() >= 3
    torch.testing.assert_close(rollout.logps[second_turns], reference[second_turns], atol=1e-5, rtol=0)
    torch.testing.assert_close(trained[mask], reference[mask], atol=1e-5, rtol=0)


def test_reward_functions_get_the_final_answer_trajectories_and_call_counts(trainer):
    seen_by_reward.calls.clear()
    rollout = episodes_of(trainer)
    experience = trainer.score_rollout(trainer.train_dataset, [0, 1], rollout, 2)
    completions, trajectories, tool_calls, answer = seen_by_reward.calls[-1]
    assert completions == [e.final_text for e in rollout.episodes] and completions[3] == "12"
    assert trajectories[0][-len(rollout.episodes[0].messages):] == rollout.episodes[0].messages
    assert trajectories[0][0]["role"] == "user"
    assert tool_calls == [{"calls": 1, "failed": 0}, {"calls": 1, "failed": 1}, {"calls": 1, "failed": 1},
                          {"calls": 0, "failed": 0}]
    assert len(answer) == 4 and experience.texts == completions


def test_the_prompt_lists_the_tools_in_the_templates_layout(trainer):
    prompt = trainer.tokenizer.decode(trainer.train_dataset.input_ids[0])
    assert "<tools>" in prompt and '"name": "multiply"' in prompt


def test_grpo_with_tools_trains_and_logs_tool_metrics(tmp_path, tiny_model_dir):
    recorder = Recorder()
    trainer = GRPOTrainer(tool_config(tmp_path, tiny_model_dir, max_steps=1), tools=[multiply])
    trainer.callbacks.append(recorder)
    trainer.sample_rollout = None  # never the one-reply path: every sample goes through the agent loop
    trainer.train()
    metrics = recorder.steps[0]
    for name in ("train/turns", "train/tools/calls_per_episode", "train/tools/error_rate",
                 "train/completions/truncated_ratio"):
        assert name in metrics


class ScriptedEngine:
    """A sampling engine that writes given turns in order (log-probs by a full forward): the tool loop of predict
    and chat, driven without a model that has learned to call."""

    def __init__(self, model, tokenizer, turns):
        self.model, self.tokenizer, self.turns, self.prompts = model, tokenizer, list(turns), []

    def sample(self, prompt_ids, params, *, num_samples=1, generator=None):
        self.prompts.append([list(ids) for ids in prompt_ids])
        rows = [list(ids) for ids in prompt_ids for _ in range(num_samples)]  # each prompt's samples, consecutive
        texts = [self.turns.pop(0) for _ in rows]
        completions = [self.tokenizer(text, add_special_tokens=False).input_ids + [self.tokenizer.eos_token_id]
                       for text in texts]
        return teacher_forced_rollout(self.model, rows, completions, pad_token_id=self.tokenizer.pad_token_id)


def test_predict_and_chat_run_the_same_tool_loop(tiny_model_dir):
    from rlhf_time.inference import InferenceModel

    model = InferenceModel.load(str(tiny_model_dir), {"max_new_tokens": 160, "disable_progress_bar": True})
    model.engine = ScriptedEngine(model.model, model.tokenizer, [CALLS[0], "The product is 12."])
    episode = model.run_tools([[{"role": "user", "content": "What is 3 times 4?"}]], tools=[multiply])[0]
    assert [m["role"] for m in episode.messages] == ["assistant", "tool", "assistant"]
    assert episode.messages[1]["content"] == "12" and episode.final_text == "The product is 12."
    second_prompt = model.tokenizer.decode(model.engine.prompts[1][0])  # the tool result is in the context
    assert second_prompt.endswith("<tool_response>\n12\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    assert '"name": "multiply"' in model.tokenizer.decode(model.engine.prompts[0][0])  # the prompt lists the tool
    model.engine = ScriptedEngine(model.model, model.tokenizer, [CALLS[0], "12"])
    assert model.chat([{"role": "user", "content": "What is 3 times 4?"}], tools=[multiply]) == "12"


def test_list_tools_false_lays_out_calls_and_results_without_the_schemas(tmp_path, tiny_model_dir):
    """A model taught its tools by demonstrations: no tool list in SFT examples, rollout prompts or predict."""
    import json

    from rlhf_time.data.builders import build_sft
    from rlhf_time.data.readers import Record

    trainer = GRPOTrainer(tool_config(tmp_path, tiny_model_dir, list_tools=False), tools=[multiply])
    assert "<tools>" not in trainer.tokenizer.decode(trainer.train_dataset.input_ids[0])
    assert len(trainer.train_dataset.input_ids[0]) < 40  # the question alone (~615 tokens with the schemas)
    rollout = episodes_of(trainer)
    ok = rollout.episodes[0]
    assert ok.tools is None and ok.messages[1]["content"] == "12"
    text = trainer.tokenizer.decode(rollout.input_ids[0][rollout.attention_mask[0].bool()].tolist())
    assert "<tools>" not in text and "<tool_response>\n12\n</tool_response>" in text
    record = json.loads((EXAMPLES / "data" / "agent_sft.jsonl").read_text().splitlines()[0])
    columns, _ = build_sft([Record("agent_sft.jsonl line 1", record)], trainer.tokenizer, trainer.config)
    ids, labels = columns["input_ids"][0], columns["labels"][0]
    assert "<tools>" not in trainer.tokenizer.decode(ids)
    trained = trainer.tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX])
    assert trained.startswith("<tool_call>\n") and trained.endswith(record["messages"][-1]["content"] + "<|im_end|>")


LLAMA_CALLS = ['{"name": "multiply", "parameters": {"a": 3, "b": 4}}',  # Llama 3.1's JSON call, ipython result
               '{"name": "multiply", "parameters": {"a": 3, "b": }}', "12", '{"name": "divide", "parameters": {}}']


@pytest.fixture(scope="module")
def llama31_trainer(tmp_path_factory, llama_model_dir):
    """A tiny Llama whose chat template writes Llama 3.1's native JSON calls and ipython results."""
    from transformers import AutoTokenizer

    from tests.data.test_tool_data import LLAMA31_TOOL_TEMPLATE

    folder = tmp_path_factory.mktemp("llama31")
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (llama_model_dir / name).is_file():
            (folder / name).write_bytes((llama_model_dir / name).read_bytes())
    tokenizer = AutoTokenizer.from_pretrained(llama_model_dir)
    tokenizer.chat_template = LLAMA31_TOOL_TEMPLATE
    tokenizer.save_pretrained(folder)
    trainer = GRPOTrainer(tool_config(folder, folder), tools=[multiply])
    trainer.model.float()
    return trainer


def test_llama31_native_calls_run_and_their_ipython_results_are_context(llama31_trainer):
    """The template's own format end to end: the call parsed from Llama 3.1 JSON, the result rendered as an ipython
    turn, the sequence the template's rendering, only sampled tokens trained, sampling log-probs = a full forward."""
    trainer = llama31_trainer
    assert trainer.agent.style == "llama3"
    rollout = trainer.agent.sample(forced_first_turn(trainer, LLAMA_CALLS), trainer.train_dataset, [0, 1],
                                   num_samples=2, max_new_tokens=160, pad_token_id=trainer.tokenizer.pad_token_id)
    ok, not_json, plain, unknown = rollout.episodes
    assert ok.messages[0]["tool_calls"] == [{"type": "function", "function": {"name": "multiply",
                                                                            "arguments": {"a": 3, "b": 4}}}]
    assert ok.messages[1]["role"] == "tool" and ok.messages[1]["content"] == "12"
    assert not_json.messages[1]["content"].startswith("error: the call is not JSON")
    assert unknown.messages[1]["content"].startswith("error: unknown tool 'divide'")
    assert plain.turns == 1 and plain.tool_calls == 0
    tokenizer = trainer.tokenizer
    ids = rollout.input_ids[0][rollout.attention_mask[0].bool()].tolist()
    text = tokenizer.decode(ids)
    assert '"name": "multiply"' in text.split("<|eot_id|>")[1]  # the tools listed in the first user turn
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n12<|eot_id|>" in text
    if not ok.truncated:
        rendered = trainer.agent.render([*ok.prompt_messages, *ok.messages], tools=ok.tools)
        assert rendered == tokenizer.decode(ids)
    completion = rollout.input_ids[0, rollout.prompt_length:]
    context = completion[~rollout.completion_mask[0] & rollout.attention_mask[0, rollout.prompt_length:].bool()]
    assert "ipython<|end_header_id|>\n\n12<|eot_id|>" in tokenizer.decode(context)  # never trained
    batch = trainer._training_batch(trainer.score_rollout(trainer.train_dataset, [0, 1], rollout, 2))
    assert torch.equal(batch["labels"][:, rollout.prompt_length:] != IGNORE_INDEX, rollout.completion_mask)
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               position_ids=batch["position_ids"]).logits.float()
    width = rollout.completion_mask.shape[1]
    reference = F.log_softmax(logits[:, -width - 1: -1], -1).gather(-1, batch["input_ids"][:, -width:, None]).squeeze(-1)
    first = len(tokenizer(LLAMA_CALLS[0], add_special_tokens=False).input_ids) + 1
    second_turn = rollout.completion_mask[0].clone()
    second_turn[:first] = False
    assert second_turn.sum() >= 3  # sampled after the ipython result
    torch.testing.assert_close(rollout.logps[0][second_turn], reference[0][second_turn], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------ the other on-policy stages with tools
CALL_3_BY_5 = '<tool_call>\n{"name": "multiply", "arguments": {"a": 3, "b": 5}}\n</tool_call>'


def calls_made(prompts, completions, tool_calls, **_):
    return [float(t["calls"] - t["failed"]) for t in tool_calls]


def scripted_tool_run(trainer_class, tmp_path, model_dir, **overrides):
    """One step of `trainer_class` with the multiply tool on 2 prompts x 2 episodes (the first of each pair calls
    the tool, the second does not); returns the trainer, its first logged step and its prepared batches."""
    values = dict(train_file=str(EXAMPLES / "data" / "agent_prompts.jsonl"), max_train_samples=4, batch_size=2,
                  max_seq_length=512, max_steps=1, logging_steps=1, learning_rate=1e-3, temperature=1.0, top_k=0,
                  eval_strategy="no", rollout={"max_completion_length": 160, "max_prompt_length": 1024,
                                               "reward_funcs": ["tests.trainer.test_tool_rollouts:calls_made"]})
    trainer = trainer_class(tiny_config(tmp_path, model_dir, **merged(values, overrides)), tools=[multiply])
    trainer.model.float()
    # 2 prompts x 2 samples: each prompt's first sample calls multiply(3, 5), its second answers at once; then the
    # two episodes that called answer after the tool's result (temperature 1: the script's log-probs are the policy's)
    trainer.sampling_engine = ScriptedEngine(trainer.model, trainer.tokenizer,
                                             [CALL_3_BY_5, "done", CALL_3_BY_5, "done", "done", "done"])
    prepared, recorder = [], Recorder()
    original = trainer.prepare_step

    def keep(micro_batches, dataset):
        batches = original(micro_batches, dataset)
        prepared.extend(batches)
        return batches

    trainer.prepare_step = keep
    trainer.callbacks.append(recorder)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    return trainer, recorder.steps[0], prepared


def trained_text(trainer, batch, row):
    """What the loss sees of one episode, and the whole episode after its prompt."""
    completion = batch["input_ids"][row, batch["input_ids"].shape[1] - batch["loss_mask"].shape[1]:]
    return (trainer.tokenizer.decode(completion[batch["loss_mask"][row].bool()]),
            trainer.tokenizer.decode(completion))


def test_online_dpo_with_tools_prefers_the_better_episode_and_trains_only_sampled_tokens(tmp_path, tiny_model_dir):
    """Online DPO over episodes: the episode that called the tool wins its pair (reward = calls that ran), the
    tool's result enters the context but not the loss, and the first step's loss is DPO's log 2 (policy = the
    reference, every pair kept)."""
    from rlhf_time import OnlineDPOTrainer

    trainer, metrics, prepared = scripted_tool_run(OnlineDPOTrainer, tmp_path, tiny_model_dir, stage="online_dpo")
    batch = prepared[0]
    assert batch["first_wins"].tolist() == [True, True] and batch["kept"].all()
    trained, whole = trained_text(trainer, batch, 0)
    assert '"name": "multiply"' in trained and "done" in trained and "15" not in trained
    assert "<tool_response>\n15\n</tool_response>" in whole
    assert metrics["train/loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert metrics["train/tools/calls_per_episode"] == 0.5 and metrics["train/tools/error_rate"] == 0.0
    assert metrics["train/turns"] == 1.5 and metrics["train/online_dpo/ties"] == 0.0


def test_rloo_with_tools_scores_episodes_leave_one_out_and_trains_only_sampled_tokens(tmp_path, tiny_model_dir):
    """RLOO (grpo.advantage_estimator: rloo) over episodes: with rewards (1, 0) per prompt the leave-one-out
    advantages are r_i - mean of the others = (+1, -1), and no tool-result token is trained."""
    trainer, metrics, prepared = scripted_tool_run(GRPOTrainer, tmp_path, tiny_model_dir, stage="grpo",
                                                   grpo={"num_generations": 2, "advantage_estimator": "rloo"})
    batch = prepared[0]
    assert torch.allclose(batch["advantages"], torch.tensor([1.0, -1.0, 1.0, -1.0]))  # one per episode (row)
    trained, whole = trained_text(trainer, batch, 0)
    assert '"name": "multiply"' in trained and "15" not in trained and "<tool_response>\n15\n</tool_response>" in whole
    assert metrics["train/tools/calls_per_episode"] == 0.5 and metrics["train/turns"] == 1.5
