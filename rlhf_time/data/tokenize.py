"""Conversations -> (input_ids, labels): loss only on assistant replies and the end-of-turn token closing each.

A conversation is first cut into text segments, each marked context or target; segments are tokenised
separately (so labels line up exactly with the tokens) and in large batches (so the fast tokenizer's
parallelism is used, as `datasets.map(batched=True)` would).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from rlhf_time.constants import IGNORE_INDEX
from rlhf_time.data.tool_render import template_messages, uses_tools
from rlhf_time.errors import RlhfTimeError

if TYPE_CHECKING:
    from rlhf_time.data.formats import PreferencePair

# Tried in this order after tokenizer.eos_token; the first one present in an assistant span closes the target.
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>", "<end_of_turn>")
Segments = list[tuple[str, bool]]  # (text, is_target)


def end_of_turn_markers(tokenizer) -> list[str]:
    """The texts that may end a turn: the tokenizer's EOS first, then the known end-of-turn tokens."""
    markers = [tokenizer.eos_token] if tokenizer.eos_token else []
    return markers + [m for m in END_OF_TURN_MARKERS if m not in markers]


class ConversationEncoder:
    """Turns conversations into token ids and labels with the configured templates or the chat template."""

    def __init__(self, tokenizer, *, prompt_template: Optional[str] = None, response_template: Optional[str] = None,
                 system_prompt: Optional[str] = None, max_seq_length: int = 2048) -> None:
        self.tokenizer = tokenizer
        self.use_templates = bool(prompt_template or response_template)
        self.prompt_template = prompt_template or "{prompt}"
        self.response_template = response_template or "{response}"
        self.system_prompt = system_prompt
        self.max_seq_length = max_seq_length
        if not self.use_templates and not getattr(tokenizer, "chat_template", None):
            raise RlhfTimeError("the tokenizer has no chat template: set prompt_template and response_template "
                                "(e.g. prompt_template='Question: {prompt}\\n', response_template='Answer: {response}')")
        if self.use_templates and not tokenizer.eos_token:
            raise RlhfTimeError("prompt_template/response_template need a tokenizer with an eos_token to end each response")
        self.end_of_turn_markers = end_of_turn_markers(tokenizer)
        bos = tokenizer.bos_token_id
        self.bos_text = tokenizer.bos_token if bos is not None and tokenizer("a").input_ids[:1] == [bos] else ""

    # --------------------------------------------------------------------------------------- segments
    def segments(self, messages: list[dict[str, Any]], location: str = "", *, last_turn_only: bool = False,
                 tools: Optional[list] = None) -> Segments:
        """Context/target text segments of a conversation; consecutive segments of one kind are merged, so the
        context before a reply is tokenised exactly as generation tokenises its prompt.

        last_turn_only: only the final assistant turn is a target (preference pairs: earlier turns are prompt).
        tools: the conversation's tool schemas; they, tool calls and tool turns are rendered by the chat template
        when it supports them, else in the Hermes layout (tool_render.py). Every assistant turn, its calls included,
        is a target; tool results never are.
        """
        messages, tools = self._for_template(messages, location, tools)
        if self.use_templates:
            segments = self._template_segments(messages)
        else:
            segments = self._chat_template_segments(messages, location, tools)
        if last_turn_only:
            last = max(i for i, (_, is_target) in enumerate(segments) if is_target)
            segments = [(text, is_target and i == last) for i, (text, is_target) in enumerate(segments)]
        merged: Segments = []
        for text, is_target in segments:
            if not text:
                continue
            if merged and merged[-1][1] == is_target:
                merged[-1] = (merged[-1][0] + text, is_target)
            else:
                merged.append((text, is_target))
        return merged

    def generation_prompt(self, messages: list[dict[str, Any]], location: str = "", tools: Optional[list] = None) -> str:
        """The text a model continues to answer `messages`: the training layout up to where the reply starts."""
        messages, tools = self._for_template(messages, location, tools)
        if self.use_templates:
            before_response = self.response_template.split("{response}", 1)[0]
            return "".join(text for text, _ in self._template_segments(messages)) + before_response
        text = self._render(messages, location, add_generation_prompt=True, tools=tools)
        return text if text.startswith(self.bos_text) else self.bos_text + text  # as the training rows have it

    def render(self, messages: list[dict[str, Any]], location: str = "", *, tools: Optional[list] = None,
               add_generation_prompt: bool = False) -> str:
        """The chat template's text of a conversation as training lays it out (the configured system prompt, tools
        natively or in the Hermes layout): what a multi-turn rollout continues."""
        messages, tools = self._for_template(messages, location, tools)
        return self._render(messages, location, add_generation_prompt=add_generation_prompt, tools=tools)

    def _for_template(self, messages: list[dict[str, Any]], location: str,
                      tools: Optional[list]) -> tuple[list[dict[str, Any]], Optional[list]]:
        """The messages (with the configured system prompt) and tools as the chat template takes them."""
        if self.system_prompt and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        if not uses_tools(messages, tools):
            return messages, None
        if self.use_templates:
            raise RlhfTimeError(f"{location}: tool calls and tool turns need the chat template; "
                                f"prompt_template/response_template cannot lay them out (unset both)")
        return template_messages(self.tokenizer, messages, tools)

    def _template_segments(self, messages) -> Segments:
        """The template layout: each response + EOS is the target (generation_prompt ends before a response)."""
        segments: Segments = [(self.bos_text, False)]
        before, after = self.response_template.split("{response}", 1)
        for message in messages:
            if message["role"] == "system":
                segments.append((message["content"] + "\n", False))
            elif message["role"] == "user":
                segments.append((self.prompt_template.replace("{prompt}", message["content"]), False))
            else:
                segments.append((before, False))
                segments.append((message["content"] + after + self.tokenizer.eos_token, True))
        return segments

    def _render(self, messages, location: str, add_generation_prompt: bool = False, tools: Optional[list] = None) -> str:
        extra = {"tools": tools} if tools else {}
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                      **extra)
        except Exception as error:  # jinja's TemplateError, raise_exception(...) in templates, ...
            raise RlhfTimeError(f"{location}: the chat template cannot render this conversation "
                                f"({type(error).__name__}: {error})") from None

    def _chat_template_segments(self, messages, location: str, tools: Optional[list] = None) -> Segments:
        full = self._render(messages, location, tools=tools)
        # A tokenizer that adds a BOS itself (add_special_tokens=True) expects it; most templates write it.
        segments: Segments = [(self.bos_text, False)] if self.bos_text and not full.startswith(self.bos_text) else []
        position = 0
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            if index:
                prompt = self._render(messages[:index], location, add_generation_prompt=True, tools=tools)
            else:  # a conversation that opens with the assistant: the context is what precedes its header
                header = self._generation_prompt(location)
                prompt = full[: full.find(header) + len(header)] if header and header in full else ""
            replied = full if index == len(messages) - 1 else self._render(messages[: index + 1], location, tools=tools)
            if not (full.startswith(prompt) and full.startswith(replied) and position <= len(prompt) <= len(replied)):
                raise RlhfTimeError(f"{location}: the chat template renders a conversation's beginning differently "
                                    f"from the whole conversation (it rewrites earlier turns), so assistant spans "
                                    f"cannot be found; set prompt_template/response_template instead")
            segments.append((full[position : len(prompt)], False))
            reply = full[len(prompt) : len(replied)]
            cut = self._end_of_target(reply)
            segments += [(reply[:cut], True), (reply[cut:], False)]
            position = len(replied)
        segments.append((full[position:], False))
        return segments

    def _generation_prompt(self, location: str) -> str:
        """The text add_generation_prompt appends (e.g. "<|im_start|>assistant\n"), found by rendering a probe."""
        probe = [{"role": "user", "content": "x"}]
        without = self._render(probe, location)
        with_prompt = self._render(probe, location, add_generation_prompt=True)
        return with_prompt[len(without) :] if with_prompt.startswith(without) else ""

    def _end_of_target(self, reply: str) -> int:
        """Index just after the last end-of-turn marker in an assistant span (the rest is template filler)."""
        for marker in self.end_of_turn_markers:
            at = reply.rfind(marker)
            if at >= 0:
                return at + len(marker)
        return len(reply)

    # -------------------------------------------------------------------------------------- encoding
    def encode_many(self, all_segments: list[Segments], batch_size: int = 4096) -> list[tuple[list[int], list[int]]]:
        """Tokenise every segment (batched) and assemble (input_ids, labels) per conversation, untruncated."""
        texts = [text for segments in all_segments for text, _ in segments]
        token_lists: list[list[int]] = []
        for start in range(0, len(texts), batch_size):
            token_lists += self._tokenize(texts[start : start + batch_size])
        encoded, cursor = [], 0
        for segments in all_segments:
            input_ids, labels = [], []
            for _, is_target in segments:
                tokens = token_lists[cursor]
                cursor += 1
                input_ids += tokens
                labels += tokens if is_target else [IGNORE_INDEX] * len(tokens)
            encoded.append((input_ids, labels))
        return encoded

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None and not getattr(self.tokenizer, "split_special_tokens", False):
            # The Rust tokenizer directly: the same ids as tokenizer(texts, add_special_tokens=False) without
            # building Python-side BatchEncodings (offsets, masks) that are thrown away.
            return [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]


def tokenize_preference_pairs(pairs: list["PreferencePair"], encoder: ConversationEncoder,
                              locations: Optional[list[str]] = None) -> list[dict[str, list[int]]]:
    """(prompt + chosen) and (prompt + rejected) of each pair, tokenised in one batch, untruncated.

    Returns per pair {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}. The masking
    rules are those of SFT, except that only the final reply is a target: assistant turns inside a multi-turn
    prompt are context.
    """
    locations = locations or [""] * len(pairs)
    segments = [encoder.segments([*pair.prompt_messages, {"role": "assistant", "content": reply}], location,
                                 last_turn_only=True)
                for pair, location in zip(pairs, locations) for reply in (pair.chosen, pair.rejected)]
    encoded = encoder.encode_many(segments)
    return [{"chosen_input_ids": encoded[2 * i][0], "chosen_labels": encoded[2 * i][1],
             "rejected_input_ids": encoded[2 * i + 1][0], "rejected_labels": encoded[2 * i + 1][1]}
            for i in range(len(pairs))]


def tokenize_preference_pair(pair: "PreferencePair", encoder: ConversationEncoder,
                             location: str = "") -> dict[str, list[int]]:
    """One pair: {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}, untruncated."""
    return tokenize_preference_pairs([pair], encoder, [location])[0]


def truncate(input_ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int], bool]:
    """Cut to max_length keeping the start of the response: from the right, and from the left of the context
    when it would leave fewer than max(1, max_length // 4) positions for targets. Returns (ids, labels, cut?)."""
    if len(input_ids) <= max_length:
        return input_ids, labels, False
    first_target = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    room = max(1, max_length // 4)
    if first_target > max_length - room:
        drop = min(first_target - (max_length - room), len(input_ids) - max_length)
        input_ids, labels = input_ids[drop:], labels[drop:]
    return input_ids[:max_length], labels[:max_length], True


def has_target(labels: list[int]) -> bool:
    """A usable example has a target after the first position (position 0 is never predicted)."""
    return any(label != IGNORE_INDEX for label in labels[1:])
