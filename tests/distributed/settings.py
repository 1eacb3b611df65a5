"""The configs shared by the torchrun worker and the single-process references of the distributed tests.

The FSDP and LoRA scenarios also use gradient checkpointing, which must not change the result.
"""

import json
import os
from pathlib import Path

from rlhf_time import TrainingConfig
from rlhf_time.data.quickstart import make_preference_records
from tests.trainer.helpers import tiny_config

WORLD_SIZE = 2
STEPS = 4
FROZEN_LAYERS = [0, 2]
# adam_epsilon=1 makes AdamW's update nearly linear in the gradient, so a wrongly weighted micro-batch or rank
# shows up as a weight difference far above float noise (as in tests/trainer/test_loop_exactness.py). No
# dropout: each rank draws its own masks, so with dropout N ranks match one process only in distribution.
EXACT = dict(group_by_length=False, learning_rate=1.0, adam_epsilon=1.0, weight_decay=0.0, max_grad_norm=None,
             lora_dropout=0.0, logging_steps=1, eval_batch_size=6)


def distributed_config(folder: Path, model_dir: Path, scenario: str, **overrides) -> TrainingConfig:
    """One rank's config: batch 4, no accumulation; on 2 ranks a step is global micro-batches {2k, 2k+1}."""
    values = dict(batch_size=4, gradient_accumulation_steps=1, max_steps=STEPS, save_strategy="steps", save_steps=2,
                  **EXACT)
    if scenario == "fsdp":
        values.update(distributed="fsdp", use_gradient_checkpointing=True)
    if scenario == "lora":
        values.update(use_lora=True, use_gradient_checkpointing=True, max_steps=2)
    if scenario == "fsdp_lora":
        values.update(distributed="fsdp", use_lora=True, use_gradient_checkpointing=True, max_steps=2)
    if scenario in ("ddp_freeze", "fsdp_freeze"):
        values.update(distributed=scenario.split("_")[0], freeze_layers=FROZEN_LAYERS, max_steps=2)
    if scenario in ("dpo_fsdp", "dpo_ddp", "rm_ddp", "rm_fsdp", "kto_ddp", "kto_fsdp"):
        stage, strategy = scenario.split("_")
        values.update(stage=stage, distributed=strategy, max_steps=2, batch_size=2, eval_batch_size=3,
                      **preference_files(folder))
    if scenario in ("kto_ddp", "kto_fsdp"):  # a reference unlike the policy: z_ref > 0 from the first step
        values.update(kto={"ref_model": str(sharper_reference_dir(model_dir))})
    if scenario in ("kd_ddp", "kd_fsdp"):  # distillation from a smaller teacher, both sharded under FSDP
        values.update(stage="kd", distributed=scenario.split("_")[1], max_steps=2,
                      kd={"teacher_model": str(teacher_dir(model_dir)), "alpha": 0.3, "loss_type": "jsd",
                          "temperature": 2.0})
    if scenario == "stream_ddp":  # streamed data: each rank reads its half of the records (every other one)
        values.update(distributed="ddp", streaming=True, shuffle_buffer_size=8)
    if scenario == "fail":
        values.update(save_strategy="no")
    values.update(overrides)
    return tiny_config(folder, model_dir, **values)


def single_process_config(folder: Path, model_dir: Path, scenario: str = "single", **overrides) -> TrainingConfig:
    """The same global batch and data order in one process: batch b x accumulation 2 (`scenario`'s settings)."""
    config = distributed_config(folder, model_dir, scenario, gradient_accumulation_steps=WORLD_SIZE, **overrides)
    return config.model_copy(update={"distributed": "auto"})


def preference_files(folder: Path) -> dict[str, str]:
    """16 training and 8 eval pairs of the synthetic preference task, written under `folder`."""
    files = {}
    for key, count, seed in (("train_file", 16, 10), ("eval_file", 8, 11)):
        path = folder / "data" / f"{key}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        # Every rank writes the same file: through a rename, so no rank ever reads another's half-written copy.
        staging = path.with_name(f"{path.name}.{os.getpid()}")
        staging.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in make_preference_records(count,
                                                                                                             seed=seed)),
                           encoding="utf-8")
        os.replace(staging, path)
        files[key] = str(path)
    return files


def teacher_dir(model_dir: Path) -> Path:
    """Where the distillation scenarios' teacher lives (built by the test before torchrun starts)."""
    return Path(model_dir).parent / "kd-teacher"


def sharper_reference_dir(model_dir: Path) -> Path:
    """Where the KTO scenarios' reference lives (built by the test before torchrun starts)."""
    return Path(model_dir).parent / "sharper-reference"


def turn_ending_model_dir(model_dir: Path) -> Path:
    """Where the environment scenario's model lives (built by build_turn_ending_model before torchrun starts)."""
    return Path(model_dir).parent / "ends-its-turns"


def build_turn_ending_model(model_dir: Path, prompts: list[str], boost: float = 3.0) -> Path:
    """The tiny random model with its end-of-turn logit raised by about `boost` where its hidden states point on
    average: it ends its turns after a few to twenty-odd tokens, so episodes run several turns and their lengths
    differ between ranks (the random model alone almost never ends a turn)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = turn_ending_model_dir(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    with torch.no_grad():
        hidden = torch.cat([model(**tokenizer(t, return_tensors="pt"), output_hidden_states=True).hidden_states[-1][0]
                            for t in texts])
        direction = hidden.mean(0)
        model.get_output_embeddings().weight[tokenizer.eos_token_id] += boost * direction / direction.norm() ** 2
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def failure_report(result) -> str:
    """What a failed torchrun printed that says why: each rank's own traceback (torchrun prefixes its lines with
    [rankN]; the rank that failed first is usually not the last one printed), then the tail of the rest."""
    lines = result.stderr.splitlines()
    ranks = sorted({line.split("]")[0] + "]" for line in lines if line.startswith("[rank")})
    per_rank = ["\n".join([line for line in lines if line.startswith(rank)][-40:]) for rank in ranks]
    return "\n\n".join([*per_rank, result.stderr[-1500:]])
