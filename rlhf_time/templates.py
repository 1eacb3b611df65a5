"""prompt_template / response_template as a Jinja chat template, so a trained model folder carries its layout.

A run with custom templates lays out text as (data/tokenize.py and inference.py):

    [bos] [system_prompt + "\\n" when no system message] then per message
      system:    content + "\\n"
      user:      prompt_template with {prompt} -> content
      assistant: response_template with {response} -> content, then eos
    generation prompt: response_template up to {response}

Saved as the tokenizer's `chat_template`, `tokenizer.apply_chat_template(messages, add_generation_prompt=True)`
in transformers, vLLM or `rlhf-time predict` on an exported model gives exactly that text.
"""

from __future__ import annotations

from typing import Optional


def jinja_string(text: str) -> str:
    """A Jinja string literal that evaluates to `text`.

    Jinja decodes string literals with Python's unicode-escape codec, so everything outside printable ASCII is
    written as an escape; literals keep the template free of raw newlines, which transformers' trim_blocks /
    lstrip_blocks settings would otherwise alter.
    """
    out = []
    for char in text:
        if char == "\\":
            out.append("\\\\")
        elif char == '"':
            out.append('\\"')
        elif " " <= char <= "~":
            out.append(char)
        else:
            out.append(f"\\U{ord(char):08x}")
    return '"' + "".join(out) + '"'


def _filled(template: str, placeholder: str) -> str:
    """Jinja expression for template with every occurrence of placeholder replaced by the message content."""
    parts = [jinja_string(part) for part in template.split(placeholder)]
    return " + message['content'] + ".join(parts)


def training_chat_template(*, prompt_template: Optional[str], response_template: Optional[str],
                           system_prompt: Optional[str], bos_text: str, eos_token: str) -> str:
    """The Jinja chat template equal to the custom-template layout used in training (see the module docstring)."""
    prompt_template = prompt_template or "{prompt}"
    response_template = response_template or "{response}"
    generation_prefix = response_template.split("{response}")[0]
    parts = []
    if bos_text:
        parts.append("{{ " + jinja_string(bos_text) + " }}")
    if system_prompt:
        parts.append("{% if not (messages | selectattr('role', 'equalto', 'system') | list) %}"
                     "{{ " + jinja_string(system_prompt + "\n") + " }}{% endif %}")
    parts.append(
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + " + jinja_string("\n") + " }}"
        "{% elif message['role'] == 'user' %}{{ " + _filled(prompt_template, "{prompt}") + " }}"
        "{% else %}{{ " + _filled(response_template, "{response}") + " + " + jinja_string(eos_token) + " }}"
        "{% endif %}{% endfor %}"
    )
    parts.append("{% if add_generation_prompt %}{{ " + jinja_string(generation_prefix) + " }}{% endif %}")
    return "".join(parts)


def bos_text_for(tokenizer) -> str:
    """The BOS text the training layout starts with: the tokenizer's BOS when it adds one itself (Llama), else ""."""
    bos_id = tokenizer.bos_token_id
    if bos_id is None:
        return ""
    return tokenizer.bos_token if tokenizer("a").input_ids[:1] == [bos_id] else ""


def apply_training_template(tokenizer, config) -> None:
    """With custom templates, make the tokenizer's chat template the training layout (saved with every folder)."""
    if config.prompt_template or config.response_template:
        tokenizer.chat_template = training_chat_template(
            prompt_template=config.prompt_template, response_template=config.response_template,
            system_prompt=config.system_prompt, bos_text=bos_text_for(tokenizer), eos_token=tokenizer.eos_token)
