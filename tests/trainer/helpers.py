"""Small builders shared by the trainer tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhf_time import SFTrainer, TrainerCallback, TrainingConfig
from rlhf_time.data.quickstart import EVAL_FILE, TRAIN_FILE
from rlhf_time.stages import SECTIONS


def tiny_config(tmp_path: Path, model_dir: Path, **overrides) -> TrainingConfig:
    values = dict(
        experiment_name="run", output_dir=str(tmp_path / "outputs"), model_name=str(model_dir),
        train_file=str(TRAIN_FILE), eval_file=str(EVAL_FILE), max_train_samples=48, max_eval_samples=16,
        batch_size=8, learning_rate=1e-3, num_train_epochs=1, max_seq_length=64, eval_strategy="no",
        save_strategy="no", report_to="none", disable_progress_bar=True, data_cache_dir=str(tmp_path / "cache"),
        warmup_steps_ratio=0.0, max_new_tokens=8, plot_metrics=False,  # charts + report: tests of their own
    )
    return TrainingConfig(**merged(values, overrides))


def merged(values: dict, overrides: dict) -> dict:
    """values with overrides applied; an option section given in both (e.g. ppo={...}) is merged key by key."""
    result = dict(values)
    for key, value in overrides.items():
        both_sections = key in SECTIONS and isinstance(value, dict) and isinstance(result.get(key), dict)
        result[key] = {**result[key], **value} if both_sections else value
    return result


class Recorder(TrainerCallback):
    """Keeps the logged metrics of every training step."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, trainer, metrics):
        self.steps.append(metrics)


def approx_metrics(expected, rel: float = 1e-5, abs: float = 1e-6):
    """pytest.approx for metrics computed two ways (e.g. N ranks vs one process). Metrics such as reward
    margins sit near zero, where float reduction order alone moves them by ~1e-7, far past any relative
    tolerance; the absolute term covers exactly that and nothing larger."""
    return pytest.approx(expected, rel=rel, abs=abs)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def train_losses(metrics_path: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}


class _Interrupt(Exception):
    pass


def interrupted_then_resumed(build, stop_at_step: int):
    """Train build(resume=False) until it reaches `stop_at_step` (raised out of its step-end callback, so that
    step is never checkpointed), then build(resume=True) -- the same run with resume_from_checkpoint=latest -- and
    train it to the end. Returns the resumed trainer."""
    interrupted = build(resume=False)

    def stop(trainer):
        if trainer.global_step == stop_at_step:
            raise _Interrupt

    interrupted.callbacks.append(stop)
    with pytest.raises(_Interrupt):
        interrupted.train()
    resumed = build(resume=True)
    resumed.train()
    return resumed


def assert_resumed_mid_run_equals_uninterrupted(build, metric: str, stop_at_step: int = 3,
                                                 steps: tuple[int, ...] = (3, 4)):
    """build(folder, resume) is a trainer writing into `folder`; the run trained uninterrupted and the same run
    stopped at `stop_at_step` and resumed from its latest checkpoint reach bit-identical weights and log the same
    (train/loss, metric) at `steps`. Returns the uninterrupted trainer."""
    full = build("full", False)
    full.train()
    resumed = interrupted_then_resumed(lambda resume: build("resumed", resume), stop_at_step=stop_at_step)
    expected, got = weights(full.model), weights(resumed.model)
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    rows = {}
    for name, trainer in (("full", full), ("resumed", resumed)):
        lines = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
        rows[name] = {line["step"]: (line["train/loss"], line[metric]) for line in lines if "train/loss" in line}
    assert all(rows["resumed"][step] == rows["full"][step] for step in steps)
    return full


def assert_resume_is_exact(full: SFTrainer, tmp_path: Path, model_dir: Path, **settings) -> None:
    """`full` has trained `settings` (max_steps=8, checkpoint at 4) uninterrupted; the same run stopped after step 4
    and resumed from its latest checkpoint must reach bit-identical weights and the same losses for steps 5-8."""
    def build(resume: bool) -> SFTrainer:
        extra = {"resume_from_checkpoint": "latest"} if resume else {}
        return SFTrainer(tiny_config(tmp_path / "resumed", model_dir, **extra, **settings))

    resumed = interrupted_then_resumed(build, stop_at_step=5)  # step 5 is never checkpointed: resume from step 4
    expected, got = weights(full.model), weights(resumed.model)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    full_losses, resumed_losses = train_losses(full.run_dir / "metrics.jsonl"), train_losses(resumed.run_dir / "metrics.jsonl")
    assert all(resumed_losses[step] == full_losses[step] for step in range(5, 9))


def build_teacher(folder: Path, model_dir: Path, seed: int = 7) -> Path:
    """A teacher for distillation tests: a smaller Qwen3 (hidden 128, 2 layers, untied head) with the tiny model's
    tokenizer and its own random weights, saved as a local folder (once)."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    if (folder / "model.safetensors").is_file():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_sharper_reference(folder: Path, model_dir: Path) -> Path:
    """A reference policy unlike the initial one: the tiny model with its final norm x3 (sharper, so lower
    log-probs on the data), saved as a local folder (once). KTO's KL reference point is then positive from the
    first step instead of clamped at 0."""
    from safetensors.torch import load_file, save_file

    if (folder / "model.safetensors").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for file in Path(model_dir).iterdir():
        if file.is_file() and file.name != "model.safetensors":
            (folder / file.name).write_bytes(file.read_bytes())
    state = load_file(Path(model_dir) / "model.safetensors")
    state["model.norm.weight"] = state["model.norm.weight"] * 3
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder
