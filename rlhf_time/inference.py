"""Inference without a trainer: load a trained folder once, then predict / chat (causal LMs) or score (reward models).

The prompt layout is the one training used (the same ConversationEncoder renders both); a folder written by
rlhf_time carries its templates and generation settings in rlhf_time_config.yaml, which are read back from there.
Nothing in a model folder can switch on `trust_remote_code`: only the caller can.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from rlhf_time.config import TrainingConfig, parse_overrides
from rlhf_time.data.formats import Messages
from rlhf_time.data.tokenize import ConversationEncoder, truncate
from rlhf_time.errors import RlhfTimeError
from rlhf_time.experience.sampler import KVCacheEngine, SamplingEngine, SamplingParams

SAVED_CONFIG = "rlhf_time_config.yaml"
CHECKPOINT_STATE = "trainer_state.json"  # marks a checkpoint-N folder (runtime.checkpoint.STATE_FILE)
# What a trained folder's saved config may set for inference: layout and generation settings, nothing else
# (never trust_remote_code: a downloaded folder must not be able to grant itself code execution).
INFERENCE_KEYS = ("prompt_template", "response_template", "system_prompt", "model_type", "max_seq_length",
                  "max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "list_tools")


def saved_config(folder: str | Path) -> dict[str, Any]:
    """The rlhf_time config a trained folder was saved with: final/'s rlhf_time_config.yaml, or a checkpoint-N
    folder's config.yaml (the run's config, written beside trainer_state.json); {} when there is none."""
    import yaml

    path = Path(folder) / SAVED_CONFIG
    if not path.is_file() and (Path(folder) / CHECKPOINT_STATE).is_file():
        path = Path(folder) / "config.yaml"
    if not path.is_file():
        return {}
    stored = yaml.safe_load(path.read_text(encoding="utf-8"))
    return stored if isinstance(stored, dict) else {}


def render_generation_prompt(tokenizer, messages: list[dict[str, str]], *, prompt_template: Optional[str] = None,
                             response_template: Optional[str] = None, system_prompt: Optional[str] = None) -> str:
    """The text the model continues: the training layout, ending where the assistant's answer starts."""
    encoder = ConversationEncoder(tokenizer, prompt_template=prompt_template, response_template=response_template,
                                  system_prompt=system_prompt)
    return encoder.generation_prompt(messages)


class InferenceModel:
    """A causal LM (predict, chat) or a reward model (score) with its tokenizer and the training layout."""

    def __init__(self, model: nn.Module, tokenizer, config: TrainingConfig, family=None, head: str = "causal_lm",
                 engine: Optional[SamplingEngine] = None):
        self.model, self.tokenizer, self.config, self.family, self.head = model, tokenizer, config, family, head
        self.engine = engine if engine is not None else KVCacheEngine(model)  # the one sampler (experience.sampler)

    # ---------------------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, folder: str, overrides: Optional[list[str] | dict[str, Any]] = None) -> "InferenceModel":
        """A trained run folder (.../final, checkpoint-N), a model or adapter folder, a hub id, or 'tiny'.

        overrides: key=value strings or a dict of TrainingConfig fields (templates, generation settings, device,
        trust_remote_code, ...), applied over what the folder was trained with.
        """
        from rlhf_time.models import ensure_chat_template, load_causal_lm, load_tokenizer, model_family

        stored = saved_config(folder)
        values = {key: stored[key] for key in INFERENCE_KEYS if key in stored}
        values.update(overrides if isinstance(overrides, dict) else parse_overrides(overrides or []))
        values.update(model_name=folder, train_file=None, eval_file=None, use_lora=False, freeze_layers=None,
                      report_to="none")
        config = TrainingConfig(**values)
        head = "reward" if is_reward_model(folder, stored) else "causal_lm"
        tokenizer = load_tokenizer(config)
        family = model_family(config)
        if not (config.prompt_template or config.response_template):
            ensure_chat_template(tokenizer, family)
        model = load_reward_model(folder)[0] if head == "reward" else load_causal_lm(config)
        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(model.to(device).eval(), tokenizer, config, family, head)

    # ------------------------------------------------------------------------------------- generation
    def predict(self, prompts: list[str], **generation: Any) -> list[str]:
        """Answer each prompt (single-turn); keyword overrides: max_new_tokens, do_sample, temperature, top_p, top_k,
        batch_size."""
        return self.generate([[{"role": "user", "content": prompt}] for prompt in prompts], **generation)

    def chat(self, messages: list[dict[str, str]], **generation: Any) -> str:
        """The assistant's reply to a conversation of {"role", "content"} messages."""
        return self.generate([messages], **generation)[0]

    def generate(self, conversations: list[Messages], **overrides: Any) -> list[str]:
        """The assistant's reply to each conversation, laid out as in training; with tools (config.tools, or
        `tools=[...]` functions or specs), the final reply of the tool loop (see run_tools)."""
        tools = overrides.pop("tools", None)
        if tools or (tools is None and self.config.tools):
            return [episode.final_text.strip() for episode in self.run_tools(conversations, tools=tools, **overrides)]
        return self.complete([self.encoder.generation_prompt(messages) for messages in conversations], **overrides)

    def run_tools(self, conversations: list[Messages], tools: Optional[list] = None, **overrides: Any) -> list:
        """One tool-calling episode per conversation, as on-policy training runs them: the prompt lists the tools,
        each turn's calls are parsed and run, their results appended as tool turns, until a turn calls nothing or
        rollout.max_tool_turns replies (max_new_tokens bounds the whole episode). The Episodes (messages: every turn
        after the prompt, call counts) in order; tools: functions or specs, else config.tools."""
        from dataclasses import replace

        from rlhf_time.experience.agent_loop import AgentLoop

        agent = AgentLoop.from_config(self.config, self.tokenizer, tools=tools if tools is not None else self.config.tools)
        params, batch_size = self._sampling(overrides)
        episodes: list = []
        for start in range(0, len(conversations), batch_size):
            def draw(prompt_ids, *, num_samples: int, max_new_tokens: int):
                return self.engine.sample(prompt_ids, replace(params, max_new_tokens=max_new_tokens),
                                          num_samples=num_samples)

            rollout = agent.sample_conversations(draw, conversations[start : start + batch_size],
                                                 max_new_tokens=params.max_new_tokens,
                                                 pad_token_id=self.tokenizer.pad_token_id)
            episodes += rollout.episodes
        return episodes

    def complete(self, texts: list[str], **overrides: Any) -> list[str]:
        """The continuation of each text as given (already rendered, or plain text for a pre-trained LM): greedy or
        sampled by the sampling engine, in batches of batch_size, each cut after its first stop token."""
        params, batch_size = self._sampling(overrides)
        config = self.config
        prompt_ids = [self.tokenizer(text, add_special_tokens=False).input_ids for text in texts]
        outputs: list[str] = []
        starts = range(0, len(prompt_ids), batch_size)
        for start in tqdm(starts, desc="generate", unit="batch", leave=False, dynamic_ncols=True,
                          disable=config.disable_progress_bar or len(starts) < 2):
            rollout = self.engine.sample(prompt_ids[start : start + batch_size], params)
            outputs += self.tokenizer.batch_decode(rollout.completion_lists(), skip_special_tokens=True)
        return [text.strip() for text in outputs]

    def _sampling(self, overrides: dict[str, Any]) -> tuple[SamplingParams, int]:
        """(sampling parameters, batch size): the config's generation settings with keyword overrides applied."""
        if self.head != "causal_lm":
            raise RlhfTimeError(f"predict/chat need a causal LM; this is a {self.head} model (use score)")
        config = self.config
        settings = dict(max_new_tokens=config.max_new_tokens, do_sample=config.do_sample, temperature=config.temperature,
                        top_p=config.top_p, top_k=config.top_k, batch_size=config.eval_batch_size or config.batch_size)
        unknown = set(overrides) - set(settings)
        if unknown:
            raise RlhfTimeError(f"unknown generation options {sorted(unknown)}; allowed: {sorted(settings)}")
        settings.update(overrides)
        batch_size = settings.pop("batch_size")
        return SamplingParams(pad_token_id=self.tokenizer.pad_token_id, stop_token_ids=tuple(self.stop_token_ids()),
                              **settings), batch_size

    def stop_token_ids(self) -> list[int]:
        """EOS and the family's end-of-turn token: generation ends at either."""
        stop = [self.tokenizer.eos_token_id]
        if self.family is not None:
            end_of_turn = self.tokenizer.convert_tokens_to_ids(self.family.end_of_turn_token)
            if isinstance(end_of_turn, int) and end_of_turn != self.tokenizer.unk_token_id and end_of_turn not in stop:
                stop.append(end_of_turn)
        return stop

    @property
    def encoder(self) -> ConversationEncoder:
        config = self.config
        return ConversationEncoder(self.tokenizer, prompt_template=config.prompt_template,
                                   response_template=config.response_template, system_prompt=config.system_prompt,
                                   max_seq_length=config.max_seq_length)

    # ---------------------------------------------------------------------------------------- scoring
    def score(self, prompts: list[str], responses: list[str], batch_size: int = 16) -> list[float]:
        """The reward of each (prompt, response), laid out exactly as in training."""
        return self.score_conversations([[{"role": "user", "content": p}, {"role": "assistant", "content": r}]
                                         for p, r in zip(prompts, responses)], batch_size)

    @torch.no_grad()
    def score_conversations(self, conversations: list[Messages], batch_size: int = 16) -> list[float]:
        """The reward of each conversation (read at its last real token)."""
        from rlhf_time.data import PaddingCollator

        if self.head != "reward":
            raise RlhfTimeError(f"score needs a reward model (trained with stage: rm); this is a {self.head} model")
        encoder = self.encoder
        encoded = encoder.encode_many([encoder.segments(c) for c in conversations])
        collator = PaddingCollator(pad_token_id=self.tokenizer.pad_token_id)
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        rewards: list[float] = []
        for start in range(0, len(encoded), batch_size):
            rows = [truncate(ids, labels, self.config.max_seq_length)[:2] for ids, labels in encoded[start : start + batch_size]]
            batch = collator([{"input_ids": ids, "labels": labels} for ids, labels in rows])
            logits = self.model(input_ids=batch["input_ids"].to(device),
                                attention_mask=batch["attention_mask"].to(device)).logits
            rewards += logits.squeeze(-1).float().tolist()
        self.model.train(was_training)
        return rewards


def is_reward_model(folder: str, stored: Optional[dict[str, Any]] = None) -> bool:
    """Whether a folder holds a reward model: trained with stage rm, a sequence-classification architecture, or a
    SEQ_CLS LoRA adapter."""
    stored = saved_config(folder) if stored is None else stored
    if stored.get("stage") == "rm":
        return True
    path = Path(folder)
    for name, key in (("config.json", "architectures"), ("adapter_config.json", "task_type")):
        file = path / name
        if file.is_file():
            value = json.loads(file.read_text(encoding="utf-8")).get(key) or []
            values = [value] if isinstance(value, str) else value
            return any(v.endswith("ForSequenceClassification") or v == "SEQ_CLS" for v in values)
    return False


def load_reward_model(model_dir: str):
    """A trained reward model folder (full, or a LoRA adapter with its score head) and its tokenizer, on CPU."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from safetensors import SafetensorError

    from rlhf_time.models.checks import require_tokenizer

    from rlhf_time.models.checks import require_safetensors

    folder = Path(model_dir)
    require_safetensors(folder, "reward model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        require_tokenizer(tokenizer, str(folder))
        adapter = folder / "adapter_config.json"
        if adapter.is_file():
            from rlhf_time.models.peft_import import use_bitsandbytes_in_peft

            use_bitsandbytes_in_peft(wanted=False)
            from peft import PeftModel

            base_path = json.loads(adapter.read_text(encoding="utf-8"))["base_model_name_or_path"]
            base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=1, dtype=torch.float32)
            base.config.pad_token_id = tokenizer.pad_token_id
            model = PeftModel.from_pretrained(base, folder)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32)
    except (OSError, ValueError, SafetensorError) as error:  # a missing or corrupt file: one line, with the folder
        raise RlhfTimeError(f"cannot load reward model {folder}: {str(error).splitlines()[0]}") from None
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def score_file(model_dir: str, input_path: str, output_path: str) -> dict[str, float]:
    """`rlhf-time score`: rewards of a file's records, written as JSONL (each record plus its reward).

    prompt/response (or messages) records get "reward"; preference pairs get "chosen_reward" and "rejected_reward",
    and the returned summary holds the share of pairs ranked right ("accuracy"). The file is read and checked
    before the model is loaded.
    """
    from rlhf_time.data import read_records
    from rlhf_time.data.formats import detect_format, to_messages, to_preference
    from rlhf_time.models.checks import require_reward_model

    require_reward_model(model_dir)  # at once for a wrong path; a causal LM would load with a random head
    records = read_records(input_path)
    fmt = detect_format(records[0], "auto")
    if fmt == "preference":
        pairs = [to_preference(r) for r in records]
        conversations = [[*pair.prompt_messages, {"role": "assistant", "content": reply}]
                         for pair in pairs for reply in (pair.chosen, pair.rejected)]
    else:
        conversations = [to_messages(r, fmt) for r in records]
    rewards = InferenceModel.load(model_dir).score_conversations(conversations)
    if fmt == "preference":
        rows = [{**r.data, "chosen_reward": rewards[2 * i], "rejected_reward": rewards[2 * i + 1]}
                for i, r in enumerate(records)]
        summary = {"pairs": len(rows), "accuracy": sum(r["chosen_reward"] > r["rejected_reward"] for r in rows) / len(rows)}
    else:
        rows = [{**r.data, "reward": reward} for r, reward in zip(records, rewards)]
        summary = {"records": len(rows), "reward_mean": sum(rewards) / len(rewards)}
    Path(output_path).parent.mkdir(parents=True, exist_ok=True)
    with open(output_path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return summary
