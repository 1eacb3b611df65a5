"""The multi-turn rollouts of a trainer: its tools or its environment answer the policy's turns.

`AgentLoop.sample` makes one Episode per completion row, its responder (`ToolResponder`: the calls of each turn,
parsed in the chat template's format and run; rlhf_time.experience.environments for an environment), renders the
prompts an environment's `reset` gives, and runs
rlhf_time.experience.episodes.sample_episodes with the trainer's sampling engine. The episodes come back as a
`Rollout` (sampled tokens in completion_mask, replies as context) whose `episodes` the scorer and the metrics read.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

from rlhf_time.agents import (assistant_message, load_tools, parse_tool_calls, run_tool_call, tool_call_style,
                              tool_result_messages, tool_schema, tools_by_name)
from rlhf_time.data.prompts import PromptDataset
from rlhf_time.data.tokenize import ConversationEncoder
from rlhf_time.errors import RlhfTimeError
from rlhf_time.experience.environments import EnvironmentResponder, load_environment, step_all
from rlhf_time.experience.episodes import Episode, reply_in_turn, sample_episodes
from rlhf_time.experience.sampler import Rollout

# Columns the reward functions receive from a multi-turn rollout (reserved: a record may not have them).
EPISODE_COLUMNS = ("trajectories", "tool_calls", "environment_reward")


class ToolResponder:
    """One episode's tools: the calls of each assistant turn, parsed in the template's format and run; their
    results are the tool turns that follow. A turn without a call ends the episode. Every failure (a call that does
    not parse, an unknown tool, an exception, a timeout, a result that is not a string or JSON) is an
    "error: ..." tool turn, counted as a failed call; the episode goes on."""

    def __init__(self, tools: dict[str, Callable], style: str, timeout: Optional[float]) -> None:
        self.tools, self.style, self.timeout = tools, style, timeout
        self.calls: list = []

    def assistant_message(self, text: str) -> dict:
        self.calls = parse_tool_calls(text, self.style)
        return assistant_message(text, self.calls, self.style)

    def reply(self, message: dict, episode: Episode) -> Optional[list]:
        if not self.calls:
            return None
        results = [run_tool_call(call, self.tools, self.timeout) for call in self.calls]
        episode.tool_calls += len(results)
        episode.failed_tool_calls += sum(failed for _, failed in results)
        return tool_result_messages(self.calls, [content for content, _ in results])


class AgentLoop:
    """Everything a trainer needs to sample multi-turn episodes (built once; `sample` per micro-batch)."""

    def __init__(self, tokenizer, encoder: ConversationEncoder, *, environment: Optional[type] = None,
                 tools: Sequence[Callable] = (), tool_timeout: Optional[float] = None, list_tools: bool = True,
                 max_replies: int = 4,
                 max_prompt_length: int = 512, concurrency: int = 16, workers: int = 1) -> None:
        if encoder.use_templates:
            raise RlhfTimeError("multi-turn rollouts (tools, rollout.environment) need a chat template; "
                                "prompt_template/response_template lay out one reply per prompt")
        if environment is not None and tools:
            raise RlhfTimeError("a run has tools or rollout.environment, not both: an environment answers every turn")
        self.tokenizer, self.encoder = tokenizer, encoder
        self.environment, self.tool_timeout = environment, tool_timeout
        self.tools = tools_by_name(tools)
        self.tool_schemas = [tool_schema(fn) for fn in tools] or None  # checked before any model loads
        self.listed = self.tool_schemas if list_tools else None  # what prompts show of the tools
        self.style = tool_call_style(tokenizer) if tools else None
        self.max_replies, self.max_prompt_length = max_replies, max_prompt_length
        self.reply_all: Callable[..., list] = (functools.partial(step_all, concurrency=concurrency, workers=workers)
                                               if environment is not None else reply_in_turn)

    @classmethod
    def from_config(cls, config, tokenizer, environment=None, tools=None) -> Optional["AgentLoop"]:
        """The run's agent loop, or None when it has neither tools nor an environment (one reply per prompt).
        environment / tools given in Python replace rollout.environment / tools."""
        environment = environment if environment is not None else config.rollout.environment
        tools = load_tools(tools if tools is not None else config.tools)
        if environment is None and not tools:
            return None
        encoder = ConversationEncoder(tokenizer, prompt_template=config.prompt_template,
                                      response_template=config.response_template, system_prompt=config.system_prompt)
        options = config.rollout
        return cls(tokenizer, encoder, environment=load_environment(environment) if environment is not None else None,
                   tools=tools, tool_timeout=options.tool_timeout, list_tools=config.list_tools,
                   max_replies=options.max_tool_turns,
                   max_prompt_length=options.max_prompt_length, concurrency=options.reward_concurrency,
                   workers=options.reward_workers)

    @property
    def environment_name(self) -> Optional[str]:
        return self.environment.__name__ if self.environment is not None else None

    def render(self, messages, add_generation_prompt: bool = False, tools: Optional[list] = None) -> str:
        """The chat template's text of an episode (tools natively or in the Hermes layout, as training renders)."""
        return self.encoder.render(messages, "episode", tools=tools, add_generation_prompt=add_generation_prompt)

    def _responder(self):
        if self.environment is not None:
            return EnvironmentResponder(self.environment)
        return ToolResponder(self.tools, self.style, self.tool_timeout)

    def sample(self, draw: Callable[..., Rollout], dataset: PromptDataset, indices: Sequence[int], *,
               num_samples: int, max_new_tokens: int, pad_token_id: int) -> Rollout:
        """num_samples episodes of each prompt dataset[indices]; `draw(prompt_ids, num_samples=, max_new_tokens=)`
        samples one turn (the trainer's engine and generator)."""
        rows = [i for i in indices for _ in range(num_samples)]
        responders = [self._responder() for _ in rows]
        episodes, prompt_ids, reset = [], [], False
        for row, index in enumerate(rows):
            record = {**{name: values[index] for name, values in dataset.columns.items()},
                      "prompt": dataset.prompts[index], "prompt_messages": dataset.prompt_messages[index]}
            first = responders[row].reset(record) if self.environment is not None else None
            messages = dataset.prompt_messages[index]
            if first is not None:  # the environment opens the conversation (the record's system message kept)
                messages = [*(m for m in messages if m["role"] == "system"), {"role": "user", "content": first}]
                reset = True
            listed = dataset.tools[index] if dataset.tools[index] is not None else self.listed
            episodes.append(Episode(prompt_messages=messages, tools=listed))
            prompt_ids.append(self._prompt_ids(messages) if first is not None else dataset.input_ids[index])
        if not reset:  # every row starts from its record's prompt: the G rows of a prompt share its first turn
            prompt_ids, shared = [dataset.input_ids[i] for i in indices], num_samples
        else:
            shared = 1
        return sample_episodes(draw, prompt_ids, episodes, responders, tokenizer=self.tokenizer, render=self.render,
                               end_markers=self.encoder.end_of_turn_markers, max_new_tokens=max_new_tokens,
                               max_replies=self.max_replies, pad_token_id=pad_token_id, num_samples=shared,
                               reply_all=self.reply_all)

    def sample_conversations(self, draw: Callable[..., Rollout], conversations: Sequence[list], *,
                             max_new_tokens: int, pad_token_id: int) -> Rollout:
        """One episode of each conversation (predict / chat with tools): its prompt lists the tools, its calls run
        until a turn calls nothing (rlhf_time.inference)."""
        episodes = [Episode(prompt_messages=list(messages), tools=self.listed) for messages in conversations]
        prompt_ids = [self._prompt_ids(messages) for messages in conversations]
        return sample_episodes(draw, prompt_ids, episodes, [self._responder() for _ in episodes],
                               tokenizer=self.tokenizer, render=self.render,
                               end_markers=self.encoder.end_of_turn_markers, max_new_tokens=max_new_tokens,
                               max_replies=self.max_replies, pad_token_id=pad_token_id, reply_all=self.reply_all)

    def _prompt_ids(self, messages) -> list[int]:
        text = self.encoder.generation_prompt(messages, "episode", tools=self.listed)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[-self.max_prompt_length :]


def episode_columns(episodes: Sequence[Episode]) -> dict[str, list]:
    """What the reward functions receive about each episode: `trajectories` (the prompt and every turn after it,
    as messages), `tool_calls` ({"calls": n, "failed": m}) and `environment_reward` (summed, or None)."""
    return {"trajectories": [[*e.prompt_messages, *e.messages] for e in episodes],
            "tool_calls": [{"calls": e.tool_calls, "failed": e.failed_tool_calls} for e in episodes],
            "environment_reward": [e.environment_reward for e in episodes]}
