"""Checks on a model folder before it is used, so that the wrong folder fails with a reason, not wrong numbers."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from rlhf_time.errors import RlhfTimeError

# "org/name" or "name": what a Hugging Face Hub id looks like (a path that does not exist but looks like this
# may still be a hub model; anything else that does not exist is simply a wrong path).
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def looks_like_hub_id(name: str) -> bool:
    return bool(HUB_ID.match(name)) and not name.startswith((".", "~")) and ".." not in name


def require_existing_folder(name: str, what: str) -> None:
    """A local path that does not exist fails at once (no minute of hub retries); hub ids pass through."""
    path = Path(name)
    if path.exists():
        if not path.is_dir():
            raise RlhfTimeError(f"{what} {name}: is a file, expected a model folder")
        return
    if not looks_like_hub_id(name):
        raise RlhfTimeError(f"{what} {name}: folder not found")


PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def require_safetensors(folder: str | Path, field: str) -> None:
    """Weights load from safetensors only: a pickle (pytorch_model.bin, ...) can run code when it is read."""
    folder = Path(folder)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLED_WEIGHTS)
    if pickles:
        raise RlhfTimeError(f"{field} {folder}: holds only pickled weights ({', '.join(pickles[:3])}); rlhf_time loads "
                            f"safetensors only, since a pickle can run code when read. Convert it once where you "
                            f"trust it: model.save_pretrained(folder) writes model.safetensors")


def require_reward_model(folder: str | Path, field: str = "", needed_by: str = "score") -> None:
    """Refuse a folder that is not a reward model: loading a causal LM as one gives a random, untrained head.

    A reward model folder is what stage=rm saves: a *ForSequenceClassification model with one label, or a
    LoRA adapter with task_type SEQ_CLS (its score head saved alongside). field names the setting in messages
    (reward_model, value_model, ...), needed_by what refuses it.
    """
    folder = Path(folder)
    require_existing_folder(str(folder), field or "reward model")
    if not folder.exists():  # a hub id: transformers checks it when loading
        return
    where = f"{field} {folder}" if field else str(folder)
    require_safetensors(folder, field or "reward model")
    hint = f"{needed_by} needs a folder trained with stage=rm"
    adapter = folder / "adapter_config.json"
    if adapter.is_file():
        task = _read_json(adapter).get("task_type")
        if task != "SEQ_CLS":
            raise RlhfTimeError(f"{where}: not a reward model (a LoRA adapter with task_type {task!r}, not "
                                f"SEQ_CLS); {hint}")
        return
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise RlhfTimeError(f"{where}: not a model folder (no config.json or adapter_config.json)")
    config = _read_json(config_file)
    architectures = config.get("architectures") or []
    labels = len(config.get("id2label") or {}) or config.get("num_labels", 2)
    if not any(name.endswith("ForSequenceClassification") for name in architectures):
        what = f"a {', '.join(architectures)}" if architectures else "no architecture recorded"
        raise RlhfTimeError(f"{where}: not a reward model ({what}, no reward head); {hint}")
    if labels != 1:
        raise RlhfTimeError(f"{where}: not a reward model (a classifier with {labels} labels, a reward model "
                            f"has 1); {hint}")


def require_tokenizer(tokenizer: Any, source: str) -> None:
    """transformers builds an empty tokenizer for a folder without tokenizer files; say that, not 'no target left'."""
    if not tokenizer("a b c 1 2 3", add_special_tokens=False)["input_ids"]:
        raise RlhfTimeError(f"{source}: no usable tokenizer (tokenizer.json / tokenizer_config.json missing?); "
                            f"copy the tokenizer files of the base model into this folder")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RlhfTimeError(f"{path}: unreadable ({error})") from None
    if not isinstance(value, dict):
        raise RlhfTimeError(f"{path}: expected a JSON object")
    return value
