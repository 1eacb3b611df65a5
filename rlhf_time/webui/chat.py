"""The Chat tab's model: a final folder, a checkpoint, a LoRA adapter or a hub id, loaded as `rlhf-time chat` loads it
(inference.InferenceModel: the training layout, nothing in the folder can turn on trust_remote_code), with replies
streamed token by token (transformers' TextIteratorStreamer)."""

from __future__ import annotations

import threading
from typing import Iterator

from rlhf_time.errors import RlhfTimeError
from rlhf_time.inference import InferenceModel


class ChatModel:
    """One loaded model; `stream` yields the growing reply to a conversation."""

    def __init__(self, source: str, trust_remote_code: bool = False):
        source = source.strip()
        if not source:
            raise RlhfTimeError("give a model: a run's final/ or checkpoint-N/ folder, an adapter folder, a hub id or tiny")
        self.source = source
        self.inference = InferenceModel.load(source, {"trust_remote_code": trust_remote_code})
        if self.inference.head != "causal_lm":
            raise RlhfTimeError(f"{source} is a reward model: score it in the Evaluate tab")

    def stream(self, messages: list[dict[str, str]], *, system_prompt: str = "", temperature: float = 0.0,
               top_p: float = 1.0, max_new_tokens: int = 128) -> Iterator[str]:
        """The reply so far, after each new piece of text; temperature 0 decodes greedily."""
        import torch
        from transformers import TextIteratorStreamer

        if system_prompt.strip():
            messages = [{"role": "system", "content": system_prompt.strip()}, *messages]
        inference = self.inference
        text = inference.encoder.generation_prompt(messages)
        input_ids = inference.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        input_ids = input_ids.to(next(inference.model.parameters()).device)
        streamer = TextIteratorStreamer(inference.tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
        settings = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer,
                        max_new_tokens=int(max_new_tokens), eos_token_id=inference.stop_token_ids(),
                        pad_token_id=inference.tokenizer.pad_token_id, **sampling)
        failure: list[BaseException] = []

        def generate() -> None:
            try:
                with torch.no_grad():
                    inference.model.generate(**settings)
            except BaseException as error:  # noqa: BLE001 - shown in the chat, the page keeps running
                failure.append(error)
                streamer.end()

        worker = threading.Thread(target=generate, daemon=True)
        worker.start()
        reply = ""
        for piece in streamer:
            reply += piece
            yield reply.strip()
        worker.join()
        if failure:
            raise RlhfTimeError(f"generation failed: {str(failure[0]).splitlines()[0] if str(failure[0]) else failure[0]!r}")
