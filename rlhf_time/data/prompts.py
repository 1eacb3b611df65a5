"""Prompt-only data for on-policy stages (GRPO, PPO): records -> prompt token ids + the fields reward functions read.

A record is {"prompt": "..."} (optionally with "system"), {"prompt": [messages]} or {"messages": [messages]}
whose last turn is not the assistant's. Every other field (e.g. "answer") is kept, unchanged, as a column passed
to the reward functions. The prompt is laid out by `ConversationEncoder.generation_prompt`, the one renderer that
training and generation use, and cut from the left to `max_prompt_length` tokens (the end of a prompt is what the answer continues).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from rlhf_time.data.formats import ROLES, Messages, _message_list, _text
from rlhf_time.data.readers import Record
from rlhf_time.data.tokenize import ConversationEncoder
from rlhf_time.data.tool_calls import record_tools
from rlhf_time.errors import RlhfTimeError

PROMPT_FIELDS = ("prompt", "messages", "system")  # consumed to build the prompt; every other field is a column


@dataclass
class PromptStats:
    """How a prompt file became prompts."""

    records: int = 0
    prompts: int = 0
    truncated: int = 0  # prompts cut from the left to max_prompt_length
    total_tokens: int = 0  # prompt tokens after truncation

    def summary(self) -> str:
        return (f"{self.prompts} prompts from {self.records} records, {self.total_tokens} prompt tokens, "
                f"{self.truncated} truncated from the left to max_prompt_length")


def to_prompt_messages(record: Record) -> Messages:
    """The conversation a prompt record describes, validated: it must not end with an assistant turn."""
    data = record.data
    if isinstance(data.get("messages"), list) or "messages" in data and "prompt" not in data:
        messages = _message_list(record, "messages", "role", "content", {r: r for r in ROLES})
    elif isinstance(data.get("prompt"), list):
        messages = _message_list(record, "prompt", "role", "content", {r: r for r in ROLES})
    elif "prompt" in data:
        messages = [{"role": "user", "content": _text(record, "prompt")}]
        if data.get("system"):
            messages.insert(0, {"role": "system", "content": _text(record, "system")})
    else:
        raise RlhfTimeError(f"{record.location}: a prompt record needs 'prompt' (text or messages) or 'messages' "
                            f"(record has: {', '.join(sorted(data)) or 'nothing'})")
    if messages[-1]["role"] == "assistant":
        raise RlhfTimeError(f"{record.location}: the prompt ends with an assistant turn; prompt data for on-policy "
                            f"stages ends with the user's turn (the model writes the answer)")
    if not any(m["role"] == "user" for m in messages):
        raise RlhfTimeError(f"{record.location}: the prompt has no user message")
    return messages


def read_prompt_records(data, config=None) -> list[Record]:
    """The records of a data set: a path / source, a list of them or a DataSpec (files, `datasets` folders, Hub
    data sets; `columns` renames applied). Sources are concatenated (mix_weights do not apply to prompts)."""
    from rlhf_time.config import TrainingConfig
    from rlhf_time.data.sources import as_spec, record_chunks

    config = config if config is not None else TrainingConfig()
    spec = as_spec(data)
    records: list[Record] = []
    for source in spec.sources:
        _, chunks = record_chunks(source, config, spec.role)
        for chunk in chunks:
            records += chunk
    return records


def validate_prompt_file(path, config=None) -> list[Record]:
    """Read and check every record (no tokenizer needed), so bad data fails before a model is loaded."""
    records = read_prompt_records(path, config)
    for record in records:
        to_prompt_messages(record)
    return records


class PromptDataset:
    """Prompts as token ids ("input_ids", left-truncated), their text ("prompt": the last user message), their
    messages ("prompt_messages"), the tool schemas their prompts list (`tools`, None without) and the record's
    other fields as columns; `lengths` are prompt token counts."""

    def __init__(self, input_ids: list[list[int]], prompt_messages: list[Messages], columns: dict[str, list],
                 stats: PromptStats, tools: Optional[list] = None) -> None:
        self.input_ids = input_ids
        self.prompt_messages = prompt_messages
        self.tools = tools if tools is not None else [None] * len(input_ids)
        self.prompts = [next(m["content"] for m in reversed(messages) if m["role"] == "user")
                        for messages in prompt_messages]
        self.columns = columns
        self.stats = stats
        self.lengths = [len(ids) for ids in input_ids]

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"input_ids": self.input_ids[index], "prompt": self.prompts[index],
                "prompt_messages": self.prompt_messages[index],
                **{name: values[index] for name, values in self.columns.items()}}

    def reward_columns(self, indices: list[int], repeat: int = 1) -> dict[str, list]:
        """The columns reward functions get for these prompts, each value repeated `repeat` times (G completions)."""
        columns = {name: [values[i] for i in indices for _ in range(repeat)] for name, values in self.columns.items()}
        columns["prompt_messages"] = [self.prompt_messages[i] for i in indices for _ in range(repeat)]
        return columns


def load_prompt_dataset(path: str | Path, tokenizer, config, *, cache_dir=None, max_samples: Optional[int] = None,
                        tools: Optional[list] = None) -> PromptDataset:
    """Prompt records of a .jsonl/.json/.csv file, rendered as generation renders them and tokenised; `tools` (JSON
    schemas: the run's tools) are listed in the prompts of records that have no `tools` of their own.

    Not cached (cache_dir is accepted for the common loader signature): prompts are short and tokenised once.
    """
    records = read_prompt_records(path, config)
    if max_samples:
        records = records[:max_samples]
    messages = [to_prompt_messages(record) for record in records]
    encoder = ConversationEncoder(tokenizer, prompt_template=config.prompt_template,
                                  response_template=config.response_template, system_prompt=config.system_prompt)
    # A record's `tools` are rendered as training renders them (the chat template's own format or the Hermes default).
    prompt_tools = [(record_tools(record) or tools) if config.list_tools else None for record in records]
    texts = [encoder.generation_prompt(m, record.location, tools=listed)
             for m, record, listed in zip(messages, records, prompt_tools)]
    stats = PromptStats(records=len(records), prompts=len(records))
    input_ids = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        if len(ids) > config.rollout.max_prompt_length:
            ids = ids[-config.rollout.max_prompt_length :]
            stats.truncated += 1
        input_ids.append(ids)
        stats.total_tokens += len(ids)
    names = list(dict.fromkeys(key for record in records for key in record.data if key not in PROMPT_FIELDS))
    for reserved in ("prompt_messages", "completion_ids", "trajectories", "tool_calls", "environment_reward"):
        if reserved in names:
            raise RlhfTimeError(f"{path}: field {reserved!r} is reserved (reward functions receive it from the trainer)")
    columns = {name: [record.data.get(name) for record in records] for name in names}
    return PromptDataset(input_ids, messages, columns, stats, prompt_tools)
