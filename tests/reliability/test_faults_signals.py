"""Fault injection, signals: SIGTERM/SIGINT/SIGUSR1 finish the step, write a checkpoint, and the resume is exact.

Signals are real (os.kill on this process, or on a CLI subprocess); the handler only sets a flag, so sending
one from a step callback is the same as the scheduler sending it at that moment.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from rlhf_time import SFTrainer
from rlhf_time.data.quickstart import TRAIN_FILE
from rlhf_time.errors import TrainingInterrupted
from rlhf_time.runtime.reporting import drop_metrics_after

from ..trainer.helpers import tiny_config, train_losses, weights

REPO = Path(__file__).resolve().parents[2]
SMALL = dict(max_train_samples=24, batch_size=4, max_seq_length=48, logging_steps=1, max_steps=5)
# What an interactive Python starts with. The suite may run with some of these ignored (a background job has
# SIGINT ignored), so every test here sets them up itself, and starts its subprocesses with them.
STARTING_HANDLERS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL,
                     signal.SIGUSR1: signal.SIG_DFL}


@pytest.fixture(autouse=True)
def starting_handlers():
    inherited = {signum: signal.signal(signum, handler) for signum, handler in STARTING_HANDLERS.items()}
    yield
    for signum, handler in inherited.items():
        signal.signal(signum, handler)


def _default_signals_in_child() -> None:
    """preexec_fn: the child starts with default dispositions, whatever this process ignores."""
    for signum in STARTING_HANDLERS:
        signal.signal(signum, signal.SIG_DFL)


def _send_at(trainer, step, signum, times=1):
    def callback(t):
        if t.global_step == step:
            for _ in range(times):
                os.kill(os.getpid(), signum)

    trainer.callbacks.append(callback)


def test_sigterm_at_a_random_step_checkpoints_and_resume_is_bit_identical(tmp_path, tiny_model_dir):
    step = random.Random().randint(1, SMALL["max_steps"] - 1)
    settings = dict(SMALL, save_strategy="steps", save_steps=3)  # the signal step is usually not a save step
    full = SFTrainer(tiny_config(tmp_path / "full", tiny_model_dir, **settings))
    full.train()

    interrupted = SFTrainer(tiny_config(tmp_path / "cut", tiny_model_dir, **settings))
    _send_at(interrupted, step, signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as stop:
        interrupted.train()
    assert stop.value.exit_code == 143, step
    assert str(stop.value) == f"saved checkpoint-{step} on SIGTERM; resume with resume_from_checkpoint=latest"
    assert (interrupted.run_dir / f"checkpoint-{step}" / "trainer_state.json").is_file()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored after train()

    resumed = SFTrainer(tiny_config(tmp_path / "cut", tiny_model_dir, resume_from_checkpoint="latest", **settings))
    resumed.train()
    expected, got = weights(full.model), weights(resumed.model)
    assert all(torch.equal(expected[name], got[name]) for name in expected), f"signal at step {step}"
    rows = [json.loads(line)["step"] for line in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [json.loads(line)["step"] for line in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()
                  if "train/loss" in json.loads(line)]
    assert train_rows == sorted(set(train_rows)) == list(range(1, SMALL["max_steps"] + 1)), rows
    assert train_losses(resumed.run_dir / "metrics.jsonl") == train_losses(full.run_dir / "metrics.jsonl")


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGUSR1, 143)])
def test_sigint_and_sigusr1_stop_with_a_checkpoint(tmp_path, tiny_model_dir, signum, code):
    trainer = SFTrainer(tiny_config(tmp_path, tiny_model_dir, **SMALL))  # save_strategy=no: saved anyway
    _send_at(trainer, 2, signum)
    with pytest.raises(TrainingInterrupted) as stop:
        trainer.train()
    assert stop.value.exit_code == code and trainer.global_step == 2
    assert sorted(p.name for p in trainer.run_dir.glob("checkpoint-*")) == ["checkpoint-2"]


def test_a_second_sigint_interrupts_at_once(tmp_path, tiny_model_dir):
    trainer = SFTrainer(tiny_config(tmp_path, tiny_model_dir, **SMALL))
    _send_at(trainer, 2, signal.SIGINT, times=2)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_signal_ignored_at_start_stays_ignored(tmp_path, tiny_model_dir):
    """`nohup rlhf-time train ... &` in a script: SIGINT arrives ignored, and a Ctrl-C meant for the foreground
    job must not stop this run. SIGTERM, not ignored, still stops it with a checkpoint."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    trainer = SFTrainer(tiny_config(tmp_path, tiny_model_dir, **SMALL))
    _send_at(trainer, 2, signal.SIGINT)
    _send_at(trainer, 3, signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as stop:
        trainer.train()
    assert stop.value.exit_code == 143 and trainer.global_step == 3
    assert sorted(p.name for p in trainer.run_dir.glob("checkpoint-*")) == ["checkpoint-3"]
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_cli_exits_143_on_sigterm_with_one_message(tmp_path, tiny_model_dir):
    config = dict(model_name=str(tiny_model_dir), output_dir=str(tmp_path / "out"), experiment_name="run",
                  train_file=str(TRAIN_FILE), batch_size=2,
                  max_seq_length=48, max_steps=100000, logging_steps=1, report_to="none",
                  disable_progress_bar=True, save_strategy="no", eval_strategy="no",
                  data_cache_dir=str(tmp_path / "cache"))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "rlhf_time", "train", str(path)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=_default_signals_in_child)
    metrics = tmp_path / "out" / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "on SIGTERM; resume with resume_from_checkpoint=latest" in line]
    assert len(lines) == 1, err[-3000:]
    step = int(lines[0].split("saved checkpoint-")[1].split()[0])
    assert (tmp_path / "out" / "run" / f"checkpoint-{step}" / "model.safetensors").is_file()
    assert max(json.loads(line)["step"] for line in metrics.read_text().splitlines()) == step


def test_drop_metrics_after_keeps_earlier_rows_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "train/loss": 2.0}, {"step": 2, "train/loss": 1.5}, {"step": 2, "eval/loss": 1.4},
            {"step": 3, "train/loss": 1.2}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "train/lo', encoding="utf-8")
    assert drop_metrics_after(path, 2) == 2
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:3]
    assert drop_metrics_after(path, 2) == 0


def test_staging_folders_of_a_killed_run_are_removed_at_the_next_start(tmp_path, tiny_model_dir):
    config = tiny_config(tmp_path, tiny_model_dir, **{**SMALL, "max_steps": 1})
    run_dir = config.run_dir
    for name in (".checkpoint-4-k1ll3d", ".final-x2y3z4"):
        (run_dir / name).mkdir(parents=True)
        (run_dir / name / "model.safetensors").write_bytes(b"half a file")
    (run_dir / ".notes").mkdir()  # not ours: left alone
    SFTrainer(config).train()
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == [".notes"]


def test_sigterm_on_one_rank_stops_every_rank_after_the_same_step(tmp_path, tiny_model_dir):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(Path(__file__).with_name("signal_worker.py")), str(tiny_model_dir), str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=_default_signals_in_child)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] if done.returncode else []
    assert done.returncode != 0 and len(ranks) == 2, done.stderr[-3000:]
    expected = {"exit_code": 143, "global_step": 2,
                "message": "saved checkpoint-2 on SIGTERM; resume with resume_from_checkpoint=latest"}
    assert ranks == [expected, expected]
    state = json.loads((tmp_path / "outputs" / "run" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["world_size"] == 2
