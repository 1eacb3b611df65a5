"""Multi-turn episodes: the policy's turns interleaved with tool results or an environment's replies.

An episode starts from a prompt. After each assistant turn a `Responder` answers with the messages that follow it
(tool turns holding the calls' results, or an environment's next user message) or ends the episode. The replies
are rendered by the chat template, tokenised, and appended to the sequence the policy reads; generation then
continues, up to `max_replies` replies, within one token budget for the whole trajectory.

The episode keeps the `Rollout` layout, so every on-policy loss trains on it unchanged:

    input_ids      pad..pad prompt | turn 1 (sampled) reply 1 (context) turn 2 (sampled) ... pad..pad
    completion_mask                  1 ... 1           0 ... 0            1 ... 1             0
    logps, entropies                 sampling's        0                  sampling's          0

Only sampled tokens are in `completion_mask`: tool results and environment messages enter the context, never the
loss, the KL or the entropy. Each turn's log-probs are those of the distribution it was sampled from, given the
whole trajectory before it, so a training forward over the assembled sequence reproduces them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence

import torch

from rlhf_time.agents import text_after_turn
from rlhf_time.experience.sampler import Rollout

Messages = list[dict[str, Any]]


@dataclass
class Episode:
    """One trajectory after its prompt: the assistant turns and the replies to them, as chat messages."""

    prompt_messages: Messages
    tools: Optional[list] = None  # the tool schemas its prompt lists (the template renders every turn with them)
    messages: Messages = field(default_factory=list)
    turns: int = 0  # assistant turns
    tool_calls: int = 0  # calls made
    failed_tool_calls: int = 0  # of those, calls that gave an error turn
    environment_reward: Optional[float] = None  # the environment's rewards, summed (None: it gave none)
    truncated: bool = False  # the token budget ended it
    out_of_replies: bool = False  # it still had a reply pending when max_replies was reached

    @property
    def final_text(self) -> str:
        """The last assistant turn's text (what the reward functions score as the completion)."""
        return next((m.get("content") or "" for m in reversed(self.messages) if m["role"] == "assistant"), "")

    def add_reward(self, reward: Optional[float]) -> None:
        if reward is not None:
            self.environment_reward = (self.environment_reward or 0.0) + float(reward)


class Responder(Protocol):
    """What answers one episode's assistant turns (one instance per episode)."""

    def assistant_message(self, text: str) -> dict[str, Any]:
        """The assistant turn as a chat message (e.g. with its parsed `tool_calls`)."""

    def reply(self, message: dict[str, Any], episode: Episode) -> Optional[Messages]:
        """The messages that follow the assistant turn, or None: the episode ends."""


@dataclass
class Turn:
    """A run of tokens in an episode: sampled by the policy (with its log-probs) or context (a rendered reply)."""

    ids: list[int]
    sampled: bool
    logps: Optional[list[float]] = None
    entropies: Optional[list[float]] = None


def reply_in_turn(responders: Sequence[Responder], messages: Sequence[dict[str, Any]],
                  episodes: Sequence[Episode]) -> list[Optional[Messages]]:
    """Each responder's reply to its episode's assistant turn, one after another."""
    return [responder.reply(message, episode) for responder, message, episode in zip(responders, messages, episodes)]


def sample_episodes(sample: Callable[..., Rollout], prompt_ids: Sequence[Sequence[int]],
                    episodes: Sequence[Episode], responders: Sequence[Responder], *, tokenizer,
                    render: Callable[..., str], end_markers: Sequence[str], max_new_tokens: int, max_replies: int,
                    pad_token_id: int, num_samples: int = 1, reply_all: Callable[..., list] = reply_in_turn) -> Rollout:
    """Sample each prompt's `num_samples` episodes (rows i*G .. i*G+G-1 belong to prompt i) and lay them out as one
    Rollout whose `episodes` are `episodes` (one per row, filled in place).

    `sample(prompt_ids, num_samples=, max_new_tokens=)` draws one turn of each given context (the sampling
    engine, with the micro-batch's generator); `render(messages, add_generation_prompt=, tools=)` is the chat
    template (each episode renders with its prompt's tools);
    `reply_all(responders, messages, episodes)` gets the replies to one turn of every episode still going (in
    turn, or concurrently). The first turn of a prompt's G episodes is drawn from the shared prompt, later turns
    from each row's own context. `max_new_tokens` bounds each trajectory (sampled and reply tokens together).
    """
    rows = len(episodes)
    prompts = [list(p) for p in prompt_ids for _ in range(num_samples)]
    turns: list[list[Turn]] = [[] for _ in range(rows)]
    used = [0] * rows
    active = list(range(rows))
    first = True
    while active:
        budget = max(max_new_tokens - used[r] for r in active)
        if first:
            drawn = sample([list(p) for p in prompt_ids], num_samples=num_samples, max_new_tokens=budget)
        else:
            drawn = sample([prompts[r] + _ids(turns[r]) for r in active], num_samples=1, max_new_tokens=budget)
        first = False
        answered = []  # (row, its assistant message, the conversation before it)
        for row_in_batch, row in enumerate(active):
            ids, logps, entropies, ended = _drawn_turn(drawn, row_in_batch, max_new_tokens - used[row])
            turns[row].append(Turn(ids, True, logps, entropies))
            used[row] += len(ids)
            episode = episodes[row]
            episode.turns += 1
            message = responders[row].assistant_message(tokenizer.decode(ids, skip_special_tokens=True))
            before = [*episode.prompt_messages, *episode.messages]
            episode.messages.append(message)
            if ended:
                answered.append((row, message, before))
            else:  # the budget ran out mid-turn
                episode.truncated = True
        replies = reply_all([responders[row] for row, _, _ in answered], [m for _, m, _ in answered],
                            [episodes[row] for row, _, _ in answered])
        active = []
        for (row, message, before), reply in zip(answered, replies):
            episode = episodes[row]
            if reply is None:
                continue
            if episode.turns > max_replies:
                episode.out_of_replies = True
                continue
            reply_ids = tokenizer(text_after_turn(functools.partial(render, tools=episode.tools), before, message, reply,
                                             end_markers),
                                  add_special_tokens=False)["input_ids"]
            episode.messages.extend(reply)
            if used[row] + len(reply_ids) >= max_new_tokens:  # no room left to answer the reply
                episode.truncated = True
                continue
            turns[row].append(Turn(reply_ids, False))
            used[row] += len(reply_ids)
            active.append(row)
    return _layout(prompt_ids, num_samples, turns, episodes, pad_token_id)


def _ids(turns: list[Turn]) -> list[int]:
    return [token for turn in turns for token in turn.ids]


def _drawn_turn(drawn: Rollout, row: int, budget: int) -> tuple[list[int], list[float], list[float], bool]:
    """Row `row` of a drawn turn, cut to `budget` tokens: (ids, logps, entropies, ended with a stop token)."""
    mask = drawn.completion_mask[row].cpu()
    ids = drawn.completion_ids[row].cpu()[mask].tolist()
    logps = drawn.logps[row].cpu()[mask].tolist()
    entropies = drawn.entropies[row].cpu()[mask].tolist()
    ended = not bool(drawn.truncated[row])
    if len(ids) > budget:
        ids, logps, entropies, ended = ids[:budget], logps[:budget], entropies[:budget], False
    return ids, logps, entropies, ended


def _layout(prompt_ids: Sequence[Sequence[int]], num_samples: int, turns: list[list[Turn]],
            episodes: Sequence[Episode], pad_token_id: int) -> Rollout:
    """The episodes as one Rollout: prompts left-padded to P, trajectories right-padded to C."""
    prompts = [list(p) for p in prompt_ids for _ in range(num_samples)]
    prompt_length = max(map(len, prompts))
    width = max(1, max(sum(len(t.ids) for t in row) for row in turns))
    n = len(prompts)
    input_ids = torch.full((n, prompt_length + width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(n, prompt_length + width, dtype=torch.long)
    completion_mask = torch.zeros(n, width, dtype=torch.bool)
    logps = torch.zeros(n, width)
    entropies = torch.zeros(n, width)
    for row, (prompt, row_turns) in enumerate(zip(prompts, turns)):
        input_ids[row, prompt_length - len(prompt) : prompt_length] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, prompt_length - len(prompt) : prompt_length] = 1
        at = 0
        for turn in row_turns:
            span = slice(at, at + len(turn.ids))
            input_ids[row, prompt_length + span.start : prompt_length + span.stop] = torch.tensor(turn.ids, dtype=torch.long)
            if turn.sampled:
                completion_mask[row, span] = True
                logps[row, span] = torch.tensor(turn.logps)
                entropies[row, span] = torch.tensor(turn.entropies)
            at = span.stop
        attention_mask[row, prompt_length : prompt_length + at] = 1
    truncated = torch.tensor([episode.truncated for episode in episodes])
    return Rollout(input_ids=input_ids, attention_mask=attention_mask, prompt_length=prompt_length,
                   completion_mask=completion_mask, truncated=truncated, logps=logps, entropies=entropies,
                   episodes=list(episodes))
