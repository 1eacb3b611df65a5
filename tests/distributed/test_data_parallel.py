"""Data parallelism on CPU (gloo, 2 processes under torchrun): DDP and FSDP2 against one process.

Exactness: 2 ranks x batch 4 take global micro-batches {2k, 2k+1} in step k+1, which is what one process with
batch 4 x accumulation 2 takes. The results agree to float tolerance (not bit-identically: an all-reduce sums
gradients in a different order than accumulation does).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rlhf_time import TrainerCallback
from rlhf_time.stages.trainers import trainer_for
from tests.trainer.helpers import approx_metrics, build_sharper_reference, build_teacher, train_losses

from .exit_probe import assert_no_gloo_thread_at_exit
from .settings import (FROZEN_LAYERS, STEPS, WORLD_SIZE, failure_report, sharper_reference_dir, single_process_config,
                       teacher_dir)

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("worker.py")
SCENARIOS = ("ddp", "fsdp", "lora", "fsdp_resume", "fsdp_lora", "ddp_freeze", "fsdp_freeze", "dpo_fsdp", "dpo_ddp", "rm_ddp",
             "rm_fsdp", "kd_ddp", "kd_fsdp", "kto_ddp", "kto_fsdp", "stream_ddp", "stream_ddp_resume")


def torchrun(*args: str, timeout: float) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD_SIZE}", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def launched(tmp_path_factory, tiny_model_dir) -> Path:
    """One torchrun launch training every scenario in turn (each in OUT/<scenario>/)."""
    out = tmp_path_factory.mktemp("torchrun")
    build_teacher(teacher_dir(tiny_model_dir), tiny_model_dir)
    build_sharper_reference(sharper_reference_dir(tiny_model_dir), tiny_model_dir)
    result = torchrun(str(WORKER), str(tiny_model_dir), str(out), *SCENARIOS, timeout=480)
    assert result.returncode == 0, failure_report(result)
    return out


class LossSpy(TrainerCallback):
    def __init__(self):
        self.losses, self.kl = {}, []

    def on_step_end(self, trainer, metrics):
        self.losses[trainer.global_step] = metrics["train/loss"]
        if "train/kl" in metrics:  # KTO's reference point
            self.kl.append(metrics["train/kl"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    """The single-process run with the same global batch and data order (full fine-tuning)."""
    trainer, spy = _train_one_process(tmp_path_factory.mktemp("single"), tiny_model_dir)
    return trainer, spy.losses, trainer.evaluate()


def _train_one_process(folder: Path, model_dir: Path, scenario: str = "single", **overrides):
    config = single_process_config(folder, model_dir, scenario, save_strategy="no", **overrides)
    trainer = trainer_for(config)
    spy = LossSpy()
    trainer.callbacks.append(spy)
    trainer.train()
    return trainer, spy


def _run_dir(out: Path, scenario: str) -> Path:
    return out / scenario / "outputs" / "run"


def _assert_same_weights(saved: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    state = model.state_dict()
    assert saved, "no weights saved"
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor, state[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("scenario", ["ddp", "fsdp"])
def test_two_ranks_reach_the_one_process_weights(launched, reference, scenario):
    trainer, losses, _ = reference
    run_dir = _run_dir(launched, scenario)
    assert train_losses(run_dir / "metrics.jsonl") == pytest.approx(losses, rel=1e-5)
    # final/ is one standard HF folder with the full (for FSDP: gathered) weights.
    _assert_same_weights(load_file(run_dir / "final" / "model.safetensors"), trainer.model)


def test_fsdp_eval_is_the_same_on_every_rank_and_matches_one_process(launched, reference):
    """16 eval examples in batches of 6: rank 1 has one batch fewer and must still join every forward."""
    _, _, single = reference
    per_rank = [json.loads((launched / "fsdp" / f"eval-rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    for key in ("eval_loss", "eval_token_accuracy", "eval_tokens"):
        assert per_rank[0][key] == per_rank[1][key]  # identical, so early stopping decides identically
        assert per_rank[0][key] == approx_metrics(single[key])


@pytest.mark.parametrize("scenario", ["ddp", "fsdp"])
def test_two_rank_checkpoint_resumes_in_one_process(launched, reference, tiny_model_dir, tmp_path, scenario):
    """A checkpoint written by 2 ranks at step 2 continues in 1 process exactly as the 1-process run did."""
    trainer, losses, _ = reference
    checkpoint = _run_dir(launched, scenario) / "checkpoint-2"
    resumed, spy = _train_one_process(tmp_path, tiny_model_dir, resume_from_checkpoint=str(checkpoint))
    assert list(spy.losses) == [3, 4]
    assert spy.losses == pytest.approx({step: losses[step] for step in (3, 4)}, rel=1e-5)
    _assert_same_weights(dict(resumed.model.named_parameters()), trainer.model)


def test_fsdp_checkpoint_resumes_under_fsdp(launched, reference):
    """Full weights and optimizer state scattered back into the shards: steps 3-4 as in the uninterrupted run."""
    trainer, losses, _ = reference
    run_dir = _run_dir(launched, "fsdp_resume")
    assert train_losses(run_dir / "metrics.jsonl") == pytest.approx({step: losses[step] for step in (3, 4)}, rel=1e-5)
    _assert_same_weights(load_file(run_dir / "final" / "model.safetensors"), trainer.model)


@pytest.mark.parametrize("scenario", ["ddp", "fsdp", "lora"])
def test_only_rank_zero_writes_the_run_folder(launched, scenario):
    run_dir = _run_dir(launched, scenario)
    steps = STEPS if scenario != "lora" else 2
    checkpoints = {f"checkpoint-{step}" for step in range(2, steps + 1, 2)}
    assert {p.name for p in run_dir.iterdir()} == {"config.yaml", "metrics.jsonl", "final", *checkpoints}
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "train/loss" in line] == list(range(1, steps + 1))  # not doubled
    assert sum("summary/global_step" in line for line in lines) == 1
    state = json.loads((run_dir / "checkpoint-2" / "trainer_state.json").read_text())
    assert (state["world_size"], state["batch_index"]) == (WORLD_SIZE, 2)


def test_lora_under_ddp_matches_one_process(launched, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer, _ = _train_one_process(tmp_path, tiny_model_dir, use_lora=True, max_steps=2)
    final = _run_dir(launched, "lora") / "final"
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, final)  # peft's own loader
    lora = {name: p for name, p in loaded.named_parameters() if "lora_" in name}
    assert lora and all(p.abs().sum() > 0 for name, p in lora.items() if "lora_B" in name)  # B starts at zero
    _assert_same_weights(lora, trainer.model)


@pytest.mark.parametrize("scenario", ["fsdp_lora", "ddp_freeze", "fsdp_freeze", "dpo_fsdp", "dpo_ddp", "rm_ddp", "rm_fsdp",
                                      "kd_ddp", "kd_fsdp", "kto_ddp", "kto_fsdp"])
def test_lora_frozen_layers_and_preference_stages_match_one_process(launched, tiny_model_dir, tmp_path, scenario):
    """FSDP with LoRA, DDP/FSDP with frozen layers (gradient checkpointing where set), DPO (under FSDP with a
    sharded frozen reference), the reward model, distillation (under FSDP with a sharded teacher) and KTO under DDP
    and FSDP: the same losses and weights as one process. KTO's KL reference point is taken over both ranks' examples
    of a step: each step's train/kl equals one process's over the same (accumulated) examples."""
    trainer, spy = _train_one_process(tmp_path, tiny_model_dir, scenario)
    run_dir = _run_dir(launched, scenario)
    assert train_losses(run_dir / "metrics.jsonl") == pytest.approx(spy.losses, rel=1e-5)
    assert list(spy.losses) == [1, 2]
    if scenario.startswith("kto"):
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        kl = [row["train/kl"] for row in rows if "train/kl" in row]
        assert len(kl) == 2 and kl[0] > 0.1 and kl == approx_metrics(spy.kl)
    final = run_dir / "final"
    if scenario == "fsdp_lora":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        loaded = PeftModel.from_pretrained(base, final)
        _assert_same_weights({n: p for n, p in loaded.named_parameters() if "lora_" in n}, trainer.model)
        return
    saved = load_file(final / "model.safetensors")
    _assert_same_weights(saved, trainer.model)
    if scenario.endswith("freeze"):
        initial = load_file(tiny_model_dir / "model.safetensors")
        frozen = [n for n in saved if any(f".layers.{i}." in n for i in FROZEN_LAYERS)]
        assert frozen and all(torch.equal(saved[n], initial[n]) for n in frozen)
        assert not torch.equal(saved["model.layers.1.mlp.down_proj.weight"], initial["model.layers.1.mlp.down_proj.weight"])
    else:  # evaluation: identical on every rank, equal to one process
        single = trainer.evaluate()
        timing = ("runtime", "per_second")  # wall-clock, not a metric
        per_rank = [{k: v for k, v in json.loads((launched / scenario / f"eval-rank{r}.json").read_text()).items()
                     if not any(t in k for t in timing)} for r in range(WORLD_SIZE)]
        assert per_rank[0] == per_rank[1]
        assert per_rank[0] == approx_metrics({k: v for k, v in single.items() if k in per_rank[0]})
        assert len(per_rank[0]) >= 5
        expected = {"rm": "eval_accuracy", "dpo": "eval_rewards/accuracies", "kd": "eval_kd_loss",
                    "kto": "eval_rewards/margins"}[scenario.split("_")[0]]
        assert expected in single


def test_cli_nproc_launches_torchrun_with_tensorboard_on_rank_zero(tmp_path, tiny_model_dir):
    values = single_process_config(tmp_path, tiny_model_dir, max_steps=2, save_strategy="no",
                                   report_to="tensorboard").to_dict()
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(values), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "rlhf_time", "train", str(config), "--nproc", "2"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, failure_report(result)
    run_dir = Path(values["output_dir"]) / values["experiment_name"]
    assert len(list((run_dir / "tensorboard").iterdir())) == 1
    assert result.stdout.count('"global_step": 2') == 1  # the results are printed by rank 0 only


def test_an_error_on_one_rank_ends_every_rank(tmp_path, tiny_model_dir):
    start = time.monotonic()
    result = torchrun(str(WORKER), str(tiny_model_dir), str(tmp_path), "fail", timeout=120)
    assert result.returncode != 0
    assert "rank 1 failed on purpose" in result.stderr
    assert time.monotonic() - start < 90


def test_streamed_data_on_two_ranks_resumes_exactly(launched):
    """Streaming under DDP: each rank reads its own records, and both ranks' stream positions are saved, so the
    run resumed from step 2 reaches the uninterrupted run's losses and weights exactly."""
    full, resumed = _run_dir(launched, "stream_ddp"), _run_dir(launched, "stream_ddp_resume")
    states = json.loads((full / "checkpoint-2" / "data_state.json").read_text())["ranks"]
    assert [(state["rank"], state["world_size"]) for state in states] == [(0, 2), (1, 2)]
    losses = train_losses(full / "metrics.jsonl")
    assert train_losses(resumed / "metrics.jsonl") == {step: losses[step] for step in (3, 4)}
    expected, got = load_file(full / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_no_gloo_thread_outlives_the_process_group(launched):
    """Fifteen runs in one process (FSDP, DDP, LoRA, streaming) leave no gloo thread for Python's shutdown (it would abort the rank)."""
    assert_no_gloo_thread_at_exit(launched)
