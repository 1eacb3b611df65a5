"""A run folder's data survives resumes, a second run, a kill during rotation and wrong resume settings:
metrics.jsonl holds each step once after any resume; a second run in a folder that is in use is refused (an OS
lock that dies with its process); rotation renames before it deletes; a resume whose batch plan changed, or that
has nothing left to train, is refused in one line before anything is written; saved folders follow the umask."""

import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rlhf_time import SFTrainer
from rlhf_time.cli import main
from rlhf_time.errors import RlhfTimeError
from rlhf_time.runtime import checkpoint as ckpt

from ..trainer.helpers import tiny_config

REPO = Path(__file__).resolve().parents[2]

SMALL = dict(max_train_samples=24, batch_size=4, max_seq_length=48, logging_steps=1, eval_file=None)


def _steps(run_dir, train_only=True):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["step"] for row in rows if "train/loss" in row or not train_only]


def _error_line(err):
    """The one `error:` line of the CLI's stderr (info lines about the model may come before it)."""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def _snapshot(run_dir):
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture
def finished_run(tmp_path, tiny_model_dir):
    """5 steps with a checkpoint every 2 steps and at the end: checkpoint-2, -4, -5, metrics of steps 1..5."""
    settings = dict(SMALL, max_steps=5, save_strategy="steps", save_steps=2)
    trainer = SFTrainer(tiny_config(tmp_path, tiny_model_dir, **settings))
    trainer.train()
    return trainer.run_dir, settings


# ------------------------------------------------------------------------------ 4. metrics after resume
def test_resume_from_an_earlier_checkpoint_drops_the_rows_logged_after_it(finished_run, tmp_path, tiny_model_dir):
    run_dir, settings = finished_run
    assert _steps(run_dir) == [1, 2, 3, 4, 5]
    SFTrainer(tiny_config(tmp_path, tiny_model_dir, **settings,
                          resume_from_checkpoint=str(run_dir / "checkpoint-2"))).train()
    assert _steps(run_dir) == [1, 2, 3, 4, 5]
    assert _steps(run_dir, train_only=False) == [1, 2, 3, 4, 5, 5]  # and one summary row


def test_kill_9_then_resume_latest_from_the_cli_logs_each_step_once(tmp_path, tiny_model_dir):
    """A real `rlhf-time train` killed with SIGKILL after step 3 (checkpoint-2 saved), then resumed: the rows of the
    killed process past checkpoint-2 are dropped, and its lock died with it."""
    settings = dict(SMALL, max_steps=6, save_strategy="steps", save_steps=2)
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(tiny_config(tmp_path, tiny_model_dir, **settings).to_dict()))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "rlhf_time", "train", str(config)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "outputs" / "run"
    deadline = time.monotonic() + 180
    while not ((run_dir / "metrics.jsonl").is_file() and 3 in _steps(run_dir)) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.02)
    process.kill()
    process.communicate()
    latest = int(ckpt.list_checkpoints(run_dir)[-1].name.split("-")[1])
    assert max(_steps(run_dir)) > latest  # the killed run logged steps its last checkpoint does not hold
    assert main(["train", str(config), "resume_from_checkpoint=latest"]) == 0
    assert _steps(run_dir) == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------------------------------ 5. one run per folder
HOLD_LOCK = textwrap.dedent("""
    import fcntl, sys, time
    handle = open(sys.argv[1], "a")
    fcntl.flock(handle, fcntl.LOCK_EX)
    print("locked", flush=True)
    time.sleep(120)
""")


def test_a_second_run_in_a_folder_in_use_is_refused_and_the_lock_dies_with_its_process(finished_run, tmp_path,
                                                                                         tiny_model_dir, capsys):
    run_dir, settings = finished_run
    before = _snapshot(run_dir)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RlhfTimeError, match=r"is in use by another training run"):
            SFTrainer(tiny_config(tmp_path, tiny_model_dir, **settings, overwrite_output_dir=True)).train()
        config = tmp_path / "b.yaml"
        config.write_text(json.dumps({**tiny_config(tmp_path, tiny_model_dir, **settings).to_dict(),
                                      "overwrite_output_dir": True}))
        capsys.readouterr()
        assert main(["train", str(config)]) == 2
        assert "in use by another training run" in _error_line(capsys.readouterr().err)
        assert {k: v for k, v in _snapshot(run_dir).items() if k != ".lock"} == \
               {k: v for k, v in before.items() if k != ".lock"}  # run A's checkpoints and metrics untouched
    finally:
        holder.kill()  # kill -9: the OS drops its lock
        holder.wait()
    SFTrainer(tiny_config(tmp_path, tiny_model_dir, **settings, overwrite_output_dir=True)).train()


PROBE_LOCK = textwrap.dedent("""
    import fcntl, sys
    try:
        fcntl.flock(open(sys.argv[1], "a"), fcntl.LOCK_EX | fcntl.LOCK_NB)
        print("free")
    except BlockingIOError:
        print("held")
""")


def test_a_training_run_holds_its_folders_lock_while_it_runs(tmp_path, tiny_model_dir):
    trainer = SFTrainer(tiny_config(tmp_path, tiny_model_dir, **SMALL, max_steps=1))
    probes = []
    trainer.callbacks.append(lambda t: probes.append(subprocess.run(
        [sys.executable, "-c", PROBE_LOCK, str(t.run_dir / ".lock")], capture_output=True, text=True).stdout.strip()))
    trainer.train()
    after = subprocess.run([sys.executable, "-c", PROBE_LOCK, str(trainer.run_dir / ".lock")], capture_output=True,
                           text=True).stdout.strip()
    assert (probes, after) == (["held"], "free")


# ----------------------------------------------------------------------------- 6. rotation renames first
def test_a_kill_during_rotation_never_leaves_a_partial_checkpoint_under_its_name(tmp_path, tiny_model_dir, monkeypatch):
    settings = dict(SMALL, max_steps=3, save_strategy="steps", save_steps=1, save_total_limit=1)
    real_rmtree = ckpt.shutil.rmtree

    def killed_half_way(path, *args, **kwargs):  # a checkpoint: deletes one file, then the process "dies"
        if "checkpoint-" not in os.path.basename(path):
            return real_rmtree(path, *args, **kwargs)
        os.unlink(os.path.join(path, "config.json"))
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        SFTrainer(tiny_config(tmp_path, tiny_model_dir, **settings)).train()
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    run_dir = tmp_path / "outputs" / "run"
    for checkpoint in run_dir.glob("checkpoint-*"):  # what resume can pick: only complete checkpoints
        assert (checkpoint / "config.json").is_file(), checkpoint
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["checkpoint-2"]
    resumed = SFTrainer(tiny_config(tmp_path, tiny_model_dir, **settings, resume_from_checkpoint="latest"))
    resumed.train()
    assert resumed.global_step == 3
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".checkpoint")) == []  # leftovers cleaned


# -------------------------------------------------------------------------- 7. the data position must hold
def test_resume_with_another_batch_size_is_refused_or_warned_with_ignore_data_position(finished_run, tmp_path,
                                                                                         tiny_model_dir, caplog):
    run_dir, settings = finished_run
    before = _snapshot(run_dir)
    changed = dict(settings, batch_size=2, resume_from_checkpoint=str(run_dir / "checkpoint-2"))
    with pytest.raises(RlhfTimeError, match=r"checkpoint-2: batch_size 4 -> 2 since this checkpoint.*"
                                            r"ignore_data_position=true"):
        SFTrainer(tiny_config(tmp_path, tiny_model_dir, **changed)).train()
    with pytest.raises(RlhfTimeError, match=r"gradient_accumulation_steps x ranks\) 1 x 1 -> 2 x 1"):
        SFTrainer(tiny_config(tmp_path, tiny_model_dir, **dict(changed, batch_size=4),
                              gradient_accumulation_steps=2)).train()
    assert _snapshot(run_dir) == before
    trainer = SFTrainer(tiny_config(tmp_path, tiny_model_dir, **changed, ignore_data_position=True))
    trainer.train()
    warnings = [r.message for r in caplog.records if "ignore_data_position" in r.message]
    assert len(warnings) == 1 and "batch_size 4 -> 2" in warnings[0]
    assert trainer.global_step == 5


# ------------------------------------------------------------------------------ 8. nothing left to train
@pytest.mark.parametrize("max_steps", [4, 5])
def test_resume_at_or_past_max_steps_is_refused_before_anything_is_written(finished_run, tmp_path, tiny_model_dir,
                                                                          capsys, max_steps):
    run_dir, settings = finished_run
    before = _snapshot(run_dir)
    config = tmp_path / "resume.yaml"
    config.write_text(json.dumps({**tiny_config(tmp_path, tiny_model_dir, **settings).to_dict(),
                                  "max_steps": max_steps, "resume_from_checkpoint": "latest"}))
    capsys.readouterr()
    assert main(["train", str(config)]) == 2
    assert f"is at step 5 and this run ends at step {max_steps}" in _error_line(capsys.readouterr().err)
    assert {k: v for k, v in _snapshot(run_dir).items() if k != ".lock"} == \
           {k: v for k, v in before.items() if k != ".lock"}


# ------------------------------------------------------------------------------ 9. predict keeps its input
def test_predict_refuses_to_overwrite_its_input(tmp_path, tiny_model_dir, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\nworld\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    os.symlink(prompts, tmp_path / "link.txt")
    for output in (prompts, tmp_path / "sub" / ".." / "prompts.txt", tmp_path / "link.txt"):
        capsys.readouterr()
        assert main(["predict", str(tiny_model_dir), "--input", str(prompts), "--output", str(output)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is the input file" in err, err
        assert prompts.read_text(encoding="utf-8") == "hello\nworld\n"


# --------------------------------------------------------------------------- 10. permissions of the umask
def test_checkpoints_and_the_final_model_get_the_umask_permissions(tmp_path, tiny_model_dir):
    old = os.umask(0o027)
    try:
        trainer = SFTrainer(tiny_config(tmp_path, tiny_model_dir, **SMALL, max_steps=1, save_strategy="steps",
                                        save_steps=1))
        trainer.train()
    finally:
        os.umask(old)
    for folder in (trainer.run_dir / "checkpoint-1", trainer.run_dir / "final"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o750, folder
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir() if p.is_file()}
        assert set(modes.values()) == {0o640}, modes
