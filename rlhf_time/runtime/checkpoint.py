"""Checkpoints: written atomically (temp folder, then rename), rotated, and loaded safely (no pickle)."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from rlhf_time.atomic import atomic_directory, move_to_trash, remove_trash
from rlhf_time.errors import RlhfTimeError
from rlhf_time.storage import disk_full_is_an_error, list_checkpoints, tensor_bytes

STATE_FILE = "trainer_state.json"
STAGE_STATE_FILE = "stage_state.pt"
DATA_STATE_FILE = "data_state.json"  # streamed train data: where each rank's stream continues
# atomic_directory stages `<target>` as `.<target>-<random>` next to it.
STAGING_PATTERN = re.compile(r"^\.(checkpoint-\d+|final|critic)-.+$")


def save_checkpoint(
    folder: Path,
    *,
    model: nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    trainer_state: dict[str, Any],
    config_yaml: str,
    stage_state: dict[str, Any] | None = None,
    data_state: str | None = None,
) -> Path:
    """Write everything needed to resume into `folder`, via a temp folder renamed at the end."""
    needed = lambda: tensor_bytes(_state_of(model), optimizer.state_dict())  # noqa: E731 - only on a full disk
    with disk_full_is_an_error(folder, "a checkpoint", needed), atomic_directory(folder) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        torch.save(scheduler.state_dict(), staging / "scheduler.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), staging / "scaler.pt")
        torch.save(_torch_rng_state(), staging / "rng_state.pt")
        state = {**trainer_state, "python_rng": _python_rng_state()}
        (staging / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
        (staging / "config.yaml").write_text(config_yaml, encoding="utf-8")
        if stage_state is not None:  # a stage's own trained state (e.g. a critic and its optimizer)
            torch.save(stage_state, staging / STAGE_STATE_FILE)
        if data_state is not None:
            (staging / DATA_STATE_FILE).write_text(data_state, encoding="utf-8")
    return folder


def save_model(folder: Path, *, model: nn.Module, tokenizer: Any, config_yaml: str) -> Path:
    """Write a model folder (weights, tokenizer, rlhf_time_config.yaml) atomically, as checkpoints are."""
    needed = lambda: tensor_bytes(_state_of(model))  # noqa: E731
    with disk_full_is_an_error(folder, "the model", needed), atomic_directory(folder) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "rlhf_time_config.yaml").write_text(config_yaml, encoding="utf-8")
    return folder


def _state_of(model: Any) -> dict[str, torch.Tensor]:
    state = model.state_dict  # parallel.GatheredModel holds the gathered dict itself
    return state() if callable(state) else state


def load_trainer_state(folder: Path) -> dict[str, Any]:
    path = folder / STATE_FILE
    if not path.is_file():
        raise RlhfTimeError(f"{folder}: not a checkpoint (no {STATE_FILE})")
    return json.loads(path.read_text(encoding="utf-8"))


def load_optimizer_states(folder: Path, optimizer, scheduler, scaler) -> None:
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    if scaler is not None and (folder / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(folder / "scaler.pt", weights_only=True))


def load_stage_state(folder: Path) -> dict[str, Any] | None:
    """What the stage saved with the checkpoint (tensors and plain values, no pickle), or None."""
    path = folder / STAGE_STATE_FILE
    return torch.load(path, weights_only=True) if path.is_file() else None


def load_data_state(folder: Path) -> str | None:
    """The streamed data's saved state (JSON text), or None when the run did not stream."""
    path = folder / DATA_STATE_FILE
    return path.read_text(encoding="utf-8") if path.is_file() else None


def restore_rng(folder: Path, state: dict[str, Any]) -> None:
    rng = torch.load(folder / "rng_state.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available() and rng.get("cuda"):
        torch.cuda.set_rng_state_all(rng["cuda"])
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))


def load_model_weights(model: nn.Module, folder: Path) -> None:
    """Load a checkpoint's weights (full model or LoRA adapter, safetensors only) into `model` in place."""
    adapter = folder / "adapter_model.safetensors"
    if adapter.is_file():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, _load_safetensors(adapter))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise RlhfTimeError(f"{folder}: adapter does not match the model (unexpected keys {unexpected[:3]}...)")
        return
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise RlhfTimeError(f"{folder}: no model weights (*.safetensors) found")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(_load_safetensors(file))
    result = model.load_state_dict(state, strict=False)
    tied = {name for name in result.missing_keys if _is_tied(model, name)}
    missing = [name for name in result.missing_keys if name not in tied]
    if missing or result.unexpected_keys:
        raise RlhfTimeError(
            f"{folder}: weights do not match the model (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})"
        )


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except SafetensorError as error:
        raise RlhfTimeError(f"{file}: truncated or corrupt ({error}); resume from an earlier checkpoint") from None


def _is_tied(model: nn.Module, name: str) -> bool:
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = getattr(model.config, "tie_word_embeddings", False)
    return bool(tied and output is not None and name.endswith("lm_head.weight"))


def resolve_checkpoint(value: str, run_dir: Path) -> Path:
    """'latest' -> the newest checkpoint in the run folder; otherwise the given folder, which must exist."""
    if value == "latest":
        checkpoints = list_checkpoints(run_dir)
        if not checkpoints:
            raise RlhfTimeError(f"resume_from_checkpoint=latest: no checkpoint-* folder in {run_dir}")
        return checkpoints[-1]
    path = Path(value)
    if not (path / STATE_FILE).is_file():
        raise RlhfTimeError(f"resume_from_checkpoint: {path} is not a checkpoint folder (no {STATE_FILE})")
    return path


def remove_staging_folders(run_dir: Path) -> list[Path]:
    """Delete the staging folders (.checkpoint-N-*, .final-*, .critic-*) and the half-deleted `.trash-` folders
    (rotation, replaced folders) a killed process left in the run folder."""
    if not run_dir.is_dir():
        return []
    stale = [p for p in run_dir.iterdir() if p.is_dir() and STAGING_PATTERN.match(p.name)]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale + remove_trash(run_dir)


def rotate_checkpoints(run_dir: Path, limit: int | None, keep: Path | None) -> None:
    """Delete the oldest checkpoints beyond `limit`, never the one in `keep` (the best).

    Each is first renamed to a `.trash-` name (atomic), so a kill during the deletion never leaves a partial
    folder under a checkpoint's name for resume to pick up; the leftovers go at the next start."""
    if limit is None:
        return
    checkpoints = list_checkpoints(run_dir)
    removable = [p for p in checkpoints if keep is None or p.resolve() != keep.resolve()]
    excess = len(checkpoints) - limit
    for path in removable[: max(0, excess)]:
        shutil.rmtree(move_to_trash(path), ignore_errors=True)


def _torch_rng_state() -> dict[str, Any]:
    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]
