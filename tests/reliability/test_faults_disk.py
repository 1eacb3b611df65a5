"""Fault injection, storage: a disk that fills up while a checkpoint or the final model is written, a read-only
output folder. Real when the test can mount a small tmpfs (root on Linux), else a writer patched to raise ENOSPC
half-way through a file. Either way: one clear line, earlier checkpoints intact, no partial folder left."""

import errno
import os
import subprocess
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf_time import SFTrainer
from rlhf_time.errors import RlhfTimeError
from rlhf_time.runtime.checkpoint import load_trainer_state

from ..trainer.helpers import tiny_config

SMALL = dict(max_train_samples=16, batch_size=4, max_seq_length=48, max_steps=3)


def _mount_tmpfs(folder: Path, size_bytes: int, read_only: bool = False):
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size_bytes}" + (",ro" if read_only else "")
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, f"rlhf-time-test-{uuid.uuid4().hex[:6]}",
                               str(folder)], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.fixture
def tmpfs(tmp_path):
    """mount(folder, size) -> bool; everything mounted is unmounted at the end."""
    mounted = []

    def mount(folder: Path, size_bytes: int, read_only: bool = False) -> bool:
        ok = os.geteuid() == 0 and _mount_tmpfs(folder, size_bytes, read_only)
        if ok:
            mounted.append(folder)
        return ok

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=20)


def _assert_checkpoint_one_is_intact(run_dir: Path, model: torch.nn.Module, weights_at_step_one):
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-1"]
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # no staging folder left
    assert load_trainer_state(run_dir / "checkpoint-1")["global_step"] == 1
    saved = load_file(run_dir / "checkpoint-1" / "model.safetensors")
    for name, value in weights_at_step_one.items():
        if name in saved:
            assert torch.equal(saved[name], value), name


def _trainer_recording_step_one(config):
    trainer = SFTrainer(config)
    recorded = {}

    def record(t):
        if t.global_step == 1:
            recorded.update({k: v.detach().clone() for k, v in t.model.state_dict().items()})

    trainer.callbacks.append(record)
    return trainer, recorded


def test_disk_full_during_a_checkpoint_patched_writer(tmp_path, tiny_model_dir, monkeypatch):
    trainer, step_one = _trainer_recording_step_one(
        tiny_config(tmp_path, tiny_model_dir, **SMALL, save_strategy="steps", save_steps=1))
    real_save, calls = torch.save, []

    def save_that_fills_the_disk(obj, target, *args, **kwargs):
        calls.append(target)
        if len(calls) > 3:  # checkpoint-1 wrote its 3 torch files; the next file is half-written, then ENOSPC
            Path(target).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, target, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_that_fills_the_disk)
    with pytest.raises(RlhfTimeError) as error:
        trainer.train()
    message = str(error.value)
    assert "checkpoint-2" in message and "no space left" in message and "needs about" in message
    assert "\n" not in message
    _assert_checkpoint_one_is_intact(trainer.run_dir, trainer.model, step_one)


def test_disk_full_on_a_real_small_filesystem(tmp_path, tiny_model_dir, tmpfs):
    probe = SFTrainer(tiny_config(tmp_path / "probe", tiny_model_dir, **{**SMALL, "max_steps": 1}, save_strategy="steps",
                                  save_steps=1))
    probe.train()
    one_checkpoint = sum(f.stat().st_size for f in (probe.run_dir / "checkpoint-1").rglob("*") if f.is_file())
    output = tmp_path / "small-disk"
    # Room for one checkpoint and the logs, not for two.
    if not tmpfs(output, int(one_checkpoint * 1.5)):
        pytest.skip("cannot mount a tmpfs here (needs root); the patched-writer test covers this")
    trainer, step_one = _trainer_recording_step_one(
        tiny_config(tmp_path, tiny_model_dir, **SMALL, save_strategy="steps", save_steps=1, output_dir=str(output)))
    with pytest.raises(RlhfTimeError, match=r"checkpoint-2: no space left .* free in"):
        trainer.train()
    _assert_checkpoint_one_is_intact(trainer.run_dir, trainer.model, step_one)


def test_disk_full_while_writing_the_final_model(tmp_path, tiny_model_dir, tmpfs):
    output = tmp_path / "small-disk"
    if not tmpfs(output, 64 * 1024):  # the logs fit, the model (~MBs) does not
        pytest.skip("cannot mount a tmpfs here (needs root)")
    trainer = SFTrainer(tiny_config(tmp_path, tiny_model_dir, **{**SMALL, "max_steps": 1}, output_dir=str(output)))
    with pytest.raises(RlhfTimeError, match=r"final: no space left on the device while writing the model"):
        trainer.train()
    assert not [p for p in trainer.run_dir.iterdir() if p.name.startswith((".final", "final"))]


@pytest.mark.parametrize("field, expected", [("output_dir", r"read-only/run: cannot write there"),
                                             ("data_cache_dir", r"data_cache_dir .*read-only: cannot write there")])
def test_read_only_folder_fails_before_loading_the_model(tmp_path, tiny_model_dir, tmpfs, field, expected):
    folder = tmp_path / "read-only"
    if not tmpfs(folder, 1024 * 1024, read_only=True):
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    with pytest.raises(RlhfTimeError, match=expected + r" \(Read-only file system\)"):
        SFTrainer(tiny_config(tmp_path, tiny_model_dir, **SMALL, **{field: str(folder)}))
