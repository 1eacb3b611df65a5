"""TrainingConfig: every knob of a run, typed, documented and validated when it is built.

The field names and defaults of the original RLHF_time trainer are kept as they were; the rest are what a
trainer needs beyond them. One YAML file mirrors this class field for field.

Beside it: config_errors (ConfigError and the wording of its messages), config_checks (value checks a type cannot
express), config_yaml (a YAML file and `key=value` overrides as plain values), config_docs (the reference).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from rlhf_time.config_checks import check_device, check_sections_belong_to_stage, first_non_finite
from rlhf_time.config_errors import ConfigError, unknown_keys_message, validation_message
from rlhf_time.config_yaml import read_yaml_mapping, resolve_relative_paths, typed_value
from rlhf_time.stages import SECTIONS, STAGES

MODEL_TYPES = ("Qwen", "Llama")
DATA_FORMATS = ("auto", "prompt_response", "messages", "alpaca", "sharegpt", "preference", "unpaired", "text")
TINY_MODEL_NAME = "tiny"
# This tool's record field names, which `columns` may map to the data's own column names.
DATA_FIELDS = ("prompt", "response", "system", "messages", "conversations", "instruction", "input", "output",
               "chosen", "rejected", "margin", "text")


def _f(default: Any, help: str, **kwargs: Any) -> Any:
    return Field(default, description=help, **kwargs)


# One field per option section (rlhf_time.stages.SECTIONS), each defaulting to its section's defaults: a new stage
# adds its section there, not fields here.
_StageSections = create_model(
    "_StageSections", __config__=ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=()),
    **{name: (section, Field(default_factory=section, description=section.__doc__.strip().splitlines()[0]))
       for name, section in SECTIONS.items()})


class TrainingConfig(_StageSections):
    """All settings of one run. Unknown keys, wrong types and out-of-range values raise ConfigError.

    Options that every stage shares are fields here; each stage's own options are in its section (`config.dpo.beta`,
    `config.grpo.num_generations`, `config.rollout.reward_funcs`, ...; see rlhf_time.stages).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    # --- run -----------------------------------------------------------------------------------------
    experiment_name: str = _f("sft_experiment", "Name of the run; outputs go to output_dir/experiment_name (non-SFT stages: <stage>_experiment).")
    output_dir: str = _f("outputs", "Folder that holds one sub-folder per experiment.")
    stage: str = _f("sft", "Training stage: sft, rm (reward model), dpo (also ORPO, SimPO), kto, kd (distillation), grpo, ppo, online_dpo; its options are in the section of the same name (rollout: shared by the on-policy stages grpo, ppo and online_dpo, which reads dpo too).")
    seed: int = _f(42, "Seed for weights init of new heads, data order and dropout.")
    device: Optional[str] = _f(None, "cuda, cuda:N or cpu; None picks cuda when available, else cpu.")

    # --- model ---------------------------------------------------------------------------------------
    model_name: str = _f("Qwen/Qwen3-8B", "Hub id or local folder of a causal LM; 'tiny' builds the embedded default offline.")
    model_type: Optional[str] = _f("Qwen", "Model family: Qwen or Llama (case-insensitive); inferred from the model when not set.")
    trust_remote_code: bool = _f(False, "Allow code shipped with a hub model to run. Off unless you trust the source.")
    attn_implementation: Optional[str] = _f(None, "Attention kernel passed to transformers (sdpa, eager, flash_attention_2); None = sdpa.")

    # --- data ----------------------------------------------------------------------------------------
    train_file: Optional[Union[str, list[str]]] = _f(None, "Training data: .jsonl/.json/.csv/.parquet, a datasets folder or hf://datasets/ORG/NAME; a list mixes several (see Data sources).")
    eval_file: Optional[Union[str, list[str]]] = _f(None, "Evaluation data, same kinds as train_file (a list is concatenated).")
    data_format: Literal["auto", "prompt_response", "messages", "alpaca", "sharegpt", "preference", "unpaired",
                         "text"] = _f(
        "auto", "Record format; auto detects it from the first record's keys; text = continued pre-training.")
    prompt_template: Optional[str] = _f(None, "Template for user turns, must contain {prompt}; None uses the tokenizer's chat template.")
    response_template: Optional[str] = _f(None, "Template for assistant turns, must contain {response}.")
    system_prompt: Optional[str] = _f(None, "System message added to conversations that have none (chat-template mode).")
    max_seq_length: int = _f(2048, "Longest tokenised example; longer ones are truncated, keeping the start of the response.", gt=0)
    max_train_samples: Optional[int] = _f(None, "Use only the first N training records.", gt=0)
    max_eval_samples: Optional[int] = _f(None, "Use only the first N evaluation records.", gt=0)
    data_cache_dir: Optional[str] = _f(None, "Where tokenised data is cached; None = output_dir/.cache.")

    # --- batching ------------------------------------------------------------------------------------
    batch_size: int = _f(8, "Examples per micro-batch (per device).", gt=0)
    eval_batch_size: Optional[int] = _f(None, "Examples per evaluation batch; None = batch_size.", gt=0)
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimiser step.", gt=0)
    shuffle: bool = _f(True, "Shuffle the data order every epoch (from seed).")
    group_by_length: bool = _f(True, "Form batches from examples of similar length so little compute goes to padding.")
    max_tokens_per_batch: Optional[int] = _f(None, "Token budget per micro-batch (padded size) instead of a fixed batch_size.", gt=0)
    packing: bool = _f(False, "Concatenate examples into rows with attention kept inside each example (padding-free).")

    # --- optimisation --------------------------------------------------------------------------------
    num_train_epochs: float = _f(3, "Passes over the training data.", gt=0)
    max_steps: Optional[int] = _f(None, "Stop after this many optimiser steps; overrides num_train_epochs.", gt=0)
    learning_rate: float = _f(2e-5, "Peak learning rate.", gt=0)
    lr_scheduler_type: Literal["linear", "cosine", "constant"] = _f("linear", "Schedule after warmup: linear, cosine or constant.")
    warmup_steps_ratio: float = _f(0.1, "Share of the total optimiser steps spent warming up linearly from 0.", ge=0, le=1)
    weight_decay: float = _f(0.01, "AdamW weight decay (not applied to biases and norm weights).", ge=0)
    adam_beta1: float = _f(0.9, "AdamW beta1.", ge=0, lt=1)
    adam_beta2: float = _f(0.999, "AdamW beta2.", ge=0, lt=1)
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.", gt=0)
    max_grad_norm: Optional[float] = _f(1.0, "Clip the global gradient norm to this; None or 0 disables clipping.", ge=0)
    label_smoothing: float = _f(0.0, "Label smoothing of the SFT cross-entropy.", ge=0, lt=1)
    loss_chunk_size: Optional[int] = _f(None, "Target tokens per chunk when the loss is computed from hidden states (memory-lean); None = sized by loss_chunk_bytes.", gt=0)
    use_amp: bool = _f(False, "Mixed precision: bf16 autocast where supported (CPU included), else fp16 with a grad scaler.")
    use_gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")

    # --- tuning strategy -----------------------------------------------------------------------------
    use_lora: bool = _f(False, "Train LoRA adapters (peft) instead of the full model.")
    lora_rank: int = _f(8, "LoRA rank r.", gt=0)
    lora_alpha: float = _f(32, "LoRA alpha (scaling = alpha / r).", gt=0)
    lora_dropout: float = _f(0.1, "Dropout on the LoRA input, in [0, 1).", ge=0, lt=1)
    lora_target_modules: Optional[list[str]] = _f(["q_proj", "v_proj"], "Module names that get adapters; the family default when not set.")
    freeze_layers: Optional[list[int]] = _f(None, "Indices of decoder layers to freeze (e.g. [0, 1, 2]); the rest trains.")

    # --- evaluation, early stopping ------------------------------------------------------------------
    eval_strategy: Literal["no", "steps", "epoch"] = _f("epoch", "When to evaluate: no, steps (every eval_steps) or epoch.")
    eval_steps: int = _f(100, "Evaluate every N optimiser steps when eval_strategy=steps.", gt=0)
    metric_for_best_model: str = _f("eval_loss", "Metric that picks the best checkpoint and drives early stopping.")
    greater_is_better: Optional[bool] = _f(None, "Whether a larger metric is better; None infers it (False for loss/perplexity).")
    early_stopping_patience: Optional[int] = _f(None, "Stop after N evaluations without improvement; None disables.", gt=0)
    early_stopping_threshold: float = _f(0.0, "Minimum improvement that counts as better.", ge=0)

    # --- checkpoints, logging ------------------------------------------------------------------------
    save_strategy: Literal["no", "steps", "epoch"] = _f("epoch", "When to save a checkpoint: no, steps or epoch.")
    save_steps: int = _f(500, "Save every N optimiser steps when save_strategy=steps.", gt=0)
    save_total_limit: Optional[int] = _f(None, "Keep at most N checkpoints (the best is never deleted); None keeps all.", gt=0)
    resume_from_checkpoint: Optional[str] = _f(None, "Checkpoint folder to resume from, or 'latest' for the newest in the run folder.")
    ignore_data_position: bool = _f(False, "Resume even though batch_size (or another setting the batch plan depends on, or accumulation x ranks) changed since the checkpoint; the saved position then points at other data.")
    logging_steps: int = _f(10, "Console/TensorBoard log every N optimiser steps.", gt=0)
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "swanlab"]] = _f(
        ["tensorboard"], "Experiment trackers besides metrics.jsonl: a list of tensorboard, wandb, mlflow, swanlab; none = [].")
    disable_progress_bar: bool = _f(False, "Hide the tqdm progress bar.")

    # --- distributed ---------------------------------------------------------------------------------
    distributed: Literal["auto", "ddp", "fsdp"] = _f("auto", "Data-parallel strategy under torchrun: ddp (auto) or fsdp (FSDP2).")
    fsdp_cpu_offload: bool = _f(False, "FSDP2: keep parameters and optimiser state on CPU.")

    # --- generation ----------------------------------------------------------------------------------
    max_new_tokens: int = _f(512, "Default number of new tokens for predict/chat.", gt=0)
    do_sample: bool = _f(False, "Sample instead of greedy decoding.")
    temperature: float = _f(1.0, "Sampling temperature.", gt=0)
    top_p: float = _f(1.0, "Nucleus sampling threshold.", gt=0, le=1)
    top_k: int = _f(50, "Top-k sampling.", ge=0)
    list_tools: bool = _f(True, "Prompts list the tools' JSON schemas (the chat template's tools=, or the Hermes system block), in SFT data, rollouts, predict and chat. false: calls and results are still laid out, the schemas are not (a model taught its tools by demonstrations; a far shorter context).")
    tools: list[str] = _f([], "Functions the model may call: 'package.module:function' or 'file.py:function'. On-policy rollouts, predict and chat run the tool loop: calls parsed from each assistant turn, results appended as tool turns (rollout.max_tool_turns, rollout.tool_timeout).")

    # --- data sources ------------------------------------------------------------------------------
    columns: Optional[dict[str, str]] = _f(None, "Map this tool's field names to the data's columns, e.g. {prompt: question, response: answer}.")
    mix_weights: Optional[list[float]] = _f(None, "With several train_file sources: the share of training examples drawn from each.")
    train_split: Optional[str] = _f(None, "Split of a datasets folder / Hub dataset to train on; None = 'train' (or the only split).")
    eval_split: Optional[str] = _f(None, "Split to evaluate on; without eval_file it is taken from the train_file data set.")
    dataset_subset: Optional[str] = _f(None, "Subset (configuration name) of a Hub / datasets-folder data set.")
    num_proc: Optional[int] = _f(None, "Processes that tokenise the data; None = 1 below 20,000 records, else up to 8.", gt=0)

    # --- model precision, quantisation and source -----------------------------------------------------
    model_dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f("auto", "Dtype the model is loaded in; auto = bfloat16 for a frozen base (LoRA, freeze_layers, quantization) on a GPU with bf16, else float32. Trainable LoRA/unfrozen weights stay float32.")
    quantization: Literal["none", "4bit", "8bit"] = _f("none", "Load the frozen base quantised with bitsandbytes (4bit = QLoRA: NF4, double quantisation, bf16 compute); LoRA only.")
    model_source: Literal["huggingface", "modelscope"] = _f("huggingface", "Where a model id (not a local folder) is downloaded from: huggingface (HF_ENDPOINT for a mirror) or modelscope.")

    # --- run folders, trackers, reports ----------------------------------------------------------------
    overwrite_output_dir: bool = _f(False, "Allow a new run in a run folder that already holds one (its metrics, charts and checkpoints are removed first).")
    tracker_project: Optional[str] = _f(None, "Project name for wandb / SwanLab and experiment name for MLflow; None = rlhf_time.")
    plot_metrics: bool = _f(True, "At the end of training write PNG charts (needs matplotlib) and report.md into the run folder.")
    report_samples: int = _f(3, "Eval prompts whose generations before/after training go into report.md (generative stages); 0 = none.", ge=0)

    # --- speed and memory (loss chunk sizing, compilation) ------------------------------------------
    loss_chunk_bytes: int = _f(128 * 2**20, "Float32 logits per loss chunk in bytes when loss_chunk_size is not set (128 MiB = 220 positions of a 151,936-row LM head): peak loss memory stays flat across vocabularies.", gt=0)
    torch_compile: bool = _f(False, "Compile the model's forward (and so its backward) with torch.compile; off by default (no gain measured on CPU, see bench/RESULTS.md).")

    # --- reliability ---------------------------------------------------------------------------------
    nan_policy: Literal["stop", "skip_step"] = _f(
        "stop", "On a non-finite loss or gradient norm: stop (error naming the last good checkpoint) or skip_step "
        "(drop that step's update, log it, and stop after nan_max_consecutive_skips in a row).")
    nan_max_consecutive_skips: int = _f(3, "nan_policy=skip_step: stop after this many consecutive skipped steps.", gt=0)

    # --- streaming (data larger than memory / disk) ---------------------------------------------------
    streaming: bool = _f(False, "Read train_file as a stream through datasets (streaming=True), tokenised on the fly, resumed exactly; needs max_steps (see Data sources, Streaming).")
    shuffle_buffer_size: int = _f(1000, "Streaming: records held by the seeded shuffle buffer (saved with each checkpoint).", gt=0)

    # --- validators ----------------------------------------------------------------------------------
    @field_validator("model_type")
    @classmethod
    def _known_model_type(cls, value: Optional[str]) -> Optional[str]:
        if value is None:
            return None
        for name in MODEL_TYPES:
            if value.lower() == name.lower():
                return name
        raise ValueError(f"unknown model_type {value!r}; allowed: {', '.join(MODEL_TYPES)} (case-insensitive)")

    @field_validator("stage")
    @classmethod
    def _known_stage(cls, value: str) -> str:
        if value not in STAGES:
            raise ValueError(f"unknown stage {value!r}; available: {', '.join(STAGES)}")
        return value

    @field_validator("prompt_template")
    @classmethod
    def _prompt_placeholder(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and "{prompt}" not in value:
            raise ValueError("must contain the placeholder {prompt}")
        return value

    @field_validator("response_template")
    @classmethod
    def _response_placeholder(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and "{response}" not in value:
            raise ValueError("must contain the placeholder {response}")
        return value

    @field_validator("freeze_layers")
    @classmethod
    def _non_negative_layers(cls, value: Optional[list[int]]) -> Optional[list[int]]:
        if value is not None and any(index < 0 for index in value):
            raise ValueError("layer indices must be >= 0")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "TrainingConfig":
        if self.use_lora and self.freeze_layers:
            raise ValueError("use_lora and freeze_layers cannot be combined: LoRA already freezes the base model")
        if self.lora_target_modules is not None and not self.lora_target_modules:
            raise ValueError("lora_target_modules: give at least one module name, or null for the family default")
        if self.stage == "kd" and not self.kd.teacher_model:
            raise ValueError("stage kd needs kd.teacher_model (a folder or hub id of the teacher)")
        if self.kd.on_policy_ratio and self.packing:
            raise ValueError("kd.on_policy_ratio > 0 samples replies into padded batches: set packing=false")
        rollout = self.rollout
        if rollout.reward_weights is not None:
            expected = len(rollout.reward_funcs) + (rollout.reward_model is not None) + (rollout.environment is not None)
            if len(rollout.reward_weights) != expected:
                raise ValueError(f"rollout.reward_weights has {len(rollout.reward_weights)} values for {expected} "
                                 f"rewards (reward_funcs{' + reward_model' if rollout.reward_model else ''}"
                                 f"{' + environment' if rollout.environment else ''})")
        if "engine" in rollout.model_fields_set and rollout.engine == "transformers_paged" and self.distributed == "fsdp":
            raise ValueError("rollout.engine transformers_paged cannot sample a sharded (FSDP) model, whose ranks must "
                             "run the same forwards: use rollout.engine kv_cache (the default under fsdp), or "
                             "distributed ddp")
        if self.stage == "ppo" and self.ppo.num_mini_batches > self.gradient_accumulation_steps:
            raise ValueError(f"ppo.num_mini_batches={self.ppo.num_mini_batches} needs at least as many micro-batches "
                             f"per step (gradient_accumulation_steps={self.gradient_accumulation_steps})")
        return self

    @model_validator(mode="before")
    @classmethod
    def _text_packs_by_default(cls, data: Any) -> Any:
        # Continued pre-training trains on every token of many short and long documents: packing wastes nothing.
        if isinstance(data, dict) and data.get("data_format") == "text" and "packing" not in data:
            data = {**data, "packing": True}
        return data

    @field_validator("columns")
    @classmethod
    def _known_column_fields(cls, value: Optional[dict[str, str]]) -> Optional[dict[str, str]]:
        unknown = sorted(set(value or {}) - set(DATA_FIELDS))
        if unknown:
            raise ValueError(f"unknown field(s) {unknown}; map this tool's fields ({', '.join(DATA_FIELDS)}) to "
                             f"your column names, e.g. {{prompt: question, response: answer}}")
        return value

    @model_validator(mode="after")
    def _data_sources_consistent(self) -> "TrainingConfig":
        if self.mix_weights is not None and self.train_file:  # (eval/predict clear train_file)
            sources = self.train_file if isinstance(self.train_file, list) else [self.train_file]
            if len(self.mix_weights) != len(sources):
                raise ValueError(f"mix_weights has {len(self.mix_weights)} weights for {len(sources)} train_file "
                                 f"source(s); give one weight per source")
            if any(weight < 0 for weight in self.mix_weights) or sum(self.mix_weights) <= 0:
                raise ValueError("mix_weights must be >= 0 with a positive sum")
        for name in ("train_file", "eval_file"):
            if isinstance(getattr(self, name), list) and not getattr(self, name):
                raise ValueError(f"{name}: give at least one source, or null")
        if self.quantization != "none" and not self.use_lora:
            raise ValueError(f"quantization {self.quantization} trains LoRA adapters on a frozen quantised base: "
                             f"set use_lora: true (or quantization: none)")
        if self.quantization != "none" and self.distributed == "fsdp":
            raise ValueError("quantization cannot be combined with distributed fsdp; use ddp (the default)")
        if self.data_format == "text" and self.stage != "sft":
            raise ValueError(f"data_format text (continued pre-training) trains a language model: use stage sft, "
                             f"not {self.stage!r}")
        return self

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers_as_list(cls, value: Any) -> Any:
        # "tensorboard", "wandb,mlflow", "none"/None/[] all accepted; stored as a list without duplicates.
        if value is None:
            return []
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, (list, tuple)):
            value = [item for item in value if str(item).lower() != "none"]
            return list(dict.fromkeys(value))
        return value

    @model_validator(mode="before")
    @classmethod
    def _stage_experiment_name(cls, data: Any) -> Any:
        # Each stage gets its own default run folder, so an RM run and a DPO run never share `final/`.
        if isinstance(data, dict) and "experiment_name" not in data and data.get("stage", "sft") != "sft":
            data = {**data, "experiment_name": f"{data['stage']}_experiment"}
        return data

    @field_validator("*")
    @classmethod
    def _finite_numbers(cls, value: Any) -> Any:
        # Nested too: reward_weights=[nan] or mix_weights=[inf] would otherwise poison a run silently.
        bad = first_non_finite(value)
        if bad is not None:
            where, number = bad
            raise ValueError(f"every number must be finite, {where} is {number}" if where else "must be a finite number")
        return value

    @field_validator("experiment_name")
    @classmethod
    def _experiment_name_is_one_folder(cls, value: str) -> str:
        # The run folder is output_dir/experiment_name: the name must not lead anywhere else.
        if not value.strip() or value in (".", "..") or any(sep in value for sep in ("/", "\\", "\0")):
            raise ValueError("must be a non-empty folder name without path separators, '.' or '..'")
        return value

    @field_validator("device")
    @classmethod
    def _usable_device(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            check_device(value)
        return value

    @model_validator(mode="after")
    def _evaluation_needs_eval_file(self) -> "TrainingConfig":
        # Settings that only mean something with evaluation must not silently do nothing. Only values other than
        # the defaults count: a saved config.yaml lists every field (eval_strategy: epoch included) and must reload.
        if self.eval_file is None and self.eval_split is None:
            asked = [f"{name}={getattr(self, name)!r}" for name in ("eval_strategy", "early_stopping_patience",
                                                                   "metric_for_best_model")
                     if getattr(self, name) not in (type(self).model_fields[name].default, "no")]
            if asked:
                raise ValueError(f"{', '.join(asked)} need eval_file (or eval_split), which is not set: nothing "
                                 f"would be evaluated")
        return self

    @model_validator(mode="before")
    @classmethod
    def _streaming_saves_by_steps(cls, data: Any) -> Any:
        # A stream has no epochs the ranks agree on: save (and evaluate) every N steps unless told otherwise.
        if isinstance(data, dict) and data.get("streaming") in (True, "true", "True"):
            evaluates = data.get("eval_file") or data.get("eval_split")
            data = {"save_strategy": "steps", "eval_strategy": "steps" if evaluates else "no", **data}
        return data

    @model_validator(mode="after")
    def _streaming_consistent(self) -> "TrainingConfig":
        if not self.streaming or not self.train_file:
            return self
        if not self.max_steps:
            raise ValueError("streaming: true needs max_steps (a stream has no length to count epochs in)")
        if self.stage in ("grpo", "ppo", "online_dpo"):
            raise ValueError(f"streaming feeds the stages sft, rm, dpo, kto and kd; {self.stage} reads its prompts "
                             f"whole: set streaming: false")
        for section in ("dpo", "kto"):
            if getattr(self, section).precompute_ref_logps:
                raise ValueError(f"{section}.precompute_ref_logps needs the whole train set up front; with streaming: "
                                 f"true set it to false (the reference model scores each batch)")
        for name in ("eval_strategy", "save_strategy"):
            if getattr(self, name) == "epoch":
                raise ValueError(f"{name}: epoch has no meaning with streaming: true; use steps (or no)")
        return self

    # --- construction with clear errors --------------------------------------------------------------
    def __init__(self, **data: Any) -> None:
        unknown = [key for key in data if key not in type(self).model_fields]
        if unknown:
            raise ConfigError(unknown_keys_message(unknown, TrainingConfig.model_fields, data.get("stage", "sft")))
        check_sections_belong_to_stage(data)
        try:
            super().__init__(**data)
        except ValidationError as error:
            raise ConfigError(validation_message(error)) from None

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in type(self).model_fields:
            raise ConfigError(unknown_keys_message([name], TrainingConfig.model_fields, self.stage))
        try:
            super().__setattr__(name, value)
        except ValidationError as error:
            raise ConfigError(validation_message(error)) from None

    # --- derived values ------------------------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        """The run folder: output_dir/experiment_name."""
        return Path(self.output_dir) / self.experiment_name

    def is_set(self, name: str) -> bool:
        """Whether the user gave this field (as opposed to it holding its default)."""
        return name in self.model_fields_set

    def metric_greater_is_better(self, metric: Optional[str] = None) -> bool:
        """Whether a larger value of `metric` (default: metric_for_best_model) is better."""
        if self.greater_is_better is not None:
            return self.greater_is_better
        return not any(word in (metric or self.metric_for_best_model) for word in ("loss", "perplexity"))

    # --- YAML ----------------------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Optional[list[str]] = None) -> "TrainingConfig":
        """Read a YAML file (safe loader) and apply `key=value` overrides typed by the schema."""
        path = Path(path)
        values = resolve_relative_paths(read_yaml_mapping(path), path.parent)
        odd_keys = [key for key in values if not isinstance(key, str)]
        if odd_keys:  # e.g. `1: x` or a bare `?`: YAML allows any key, a config only field names
            raise ConfigError(f"{path}: config keys must be field names, got {odd_keys[0]!r}")
        for key, value in parse_overrides(overrides or []).items():  # a section's keys merge into its mapping
            values[key] = {**values[key], **value} if isinstance(values.get(key), dict) and key in SECTIONS else value
        try:
            return cls(**values)
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        """Every shared field, and the option sections of this run's stage only (a saved config reloads as is)."""
        values = self.model_dump(mode="json", exclude=set(SECTIONS) - set(STAGES[self.stage].sections))
        sections = {name: values.pop(name) for name in STAGES[self.stage].sections}  # the stage's own first
        return {**values, **sections}  # the shared fields first, as --help-config lists them

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ['batch_size=4', 'freeze_layers=[0,1]', 'grpo.num_generations=4'] into typed values (a section's keys
    into a mapping under its name); strings stay strings for str fields."""
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {pair!r} is not of the form key=value")
        section, dot, name = key.partition(".")
        if dot:
            fields = SECTIONS[section].model_fields if section in SECTIONS else {}
            if name not in fields:
                raise ConfigError(unknown_keys_message([key], TrainingConfig.model_fields))
            values.setdefault(section, {})[name] = typed_value(fields[name].annotation, raw)
        elif key not in TrainingConfig.model_fields:
            raise ConfigError(unknown_keys_message([key], TrainingConfig.model_fields))
        elif key in SECTIONS:
            raise ConfigError(f"{key} is a section: set its options one by one, e.g. {key}.{next(iter(SECTIONS[key].model_fields))}=...")
        else:
            values[key] = typed_value(TrainingConfig.model_fields[key].annotation, raw)
    return values

