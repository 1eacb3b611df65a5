"""Conversations -> (input_ids, labels): loss only on assistant replies and the end-of-turn token closing each.

A conversation is first cut into text segments, each marked context or target; segments are tokenised
separately (so labels line up exactly with the tokens) and in large batches (so the fast tokenizer's
parallelism is used, as `datasets.map(batched=True)` would).
"""

from __future__ import annotations

from typing import Optional

from rlhf_time.errors import RlhfTimeError

IGNORE_INDEX = -100
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>")
Segments = list[tuple[str, bool]]  # (text, is_target)


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
        markers = [tokenizer.eos_token] if tokenizer.eos_token else []
        self.end_of_turn_markers = markers + [m for m in END_OF_TURN_MARKERS if m not in markers]
        bos = tokenizer.bos_token_id
        self.bos_text = tokenizer.bos_token if bos is not None and tokenizer("a").input_ids[:1] == [bos] else ""

    # --------------------------------------------------------------------------------------- segments
    def segments(self, messages: list[dict[str, str]], location: str = "") -> Segments:
        if self.system_prompt and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        if self.use_templates:
            return self._template_segments(messages)
        return self._chat_template_segments(messages, location)

    def _template_segments(self, messages) -> Segments:
        """Same layout as generation.render_generation_prompt, with each response + EOS as the target."""
        segments: Segments = [(self.bos_text, False)] if self.bos_text else []
        before, after = self.response_template.split("{response}", 1)
        for message in messages:
            if message["role"] == "system":
                segments.append((message["content"] + "\n", False))
            elif message["role"] == "user":
                segments.append((self.prompt_template.replace("{prompt}", message["content"]), False))
            else:
                segments.append((before, False))
                segments.append((message["content"] + after + self.tokenizer.eos_token, True))
        return [s for s in segments if s[0]]

    def _chat_template_segments(self, messages, location: str) -> Segments:
        render = self.tokenizer.apply_chat_template
        full = render(messages, tokenize=False)
        segments: Segments = []
        position = 0
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = render(messages[:index], tokenize=False, add_generation_prompt=True) if index else ""
            replied = render(messages[: index + 1], tokenize=False)
            if not (full.startswith(prompt) and full.startswith(replied) and position <= len(prompt) <= len(replied)):
                raise RlhfTimeError(f"{location}: the chat template rewrites earlier turns, so assistant spans cannot "
                                    f"be found; set prompt_template/response_template instead")
            segments.append((full[position : len(prompt)], False))
            reply = full[len(prompt) : len(replied)]
            cut = self._end_of_target(reply)
            segments += [(reply[:cut], True), (reply[cut:], False)]
            position = len(replied)
        segments.append((full[position:], False))
        return [s for s in segments if s[0]]

    def _end_of_target(self, reply: str) -> int:
        """Index just after the last end-of-turn marker in an assistant span (the rest is template filler)."""
        for marker in self.end_of_turn_markers:
            at = reply.rfind(marker)
            if at >= 0:
                return at + len(marker)
        return len(reply)

    # -------------------------------------------------------------------------------------- encoding
    def encode_many(self, all_segments: list[Segments], batch_size: int = 2048) -> list[tuple[list[int], list[int]]]:
        """Tokenise every segment (batched) and assemble (input_ids, labels) per conversation, untruncated."""
        texts = [text for segments in all_segments for text, _ in segments]
        token_lists: list[list[int]] = []
        for start in range(0, len(texts), batch_size):
            token_lists += self.tokenizer(texts[start : start + batch_size], add_special_tokens=False)["input_ids"]
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
