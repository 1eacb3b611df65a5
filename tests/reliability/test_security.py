"""Code shipped inside a model folder runs only when the user asks for it (command line or their own config)."""

import json
import shutil

import yaml

from rlhf_time.cli import main

EVIL_CODE = '''
from pathlib import Path
Path({marker!r}).write_text("code from the model folder ran")
from transformers import Qwen3Config, Qwen3ForCausalLM
class EvilConfig(Qwen3Config):
    pass
class EvilModel(Qwen3ForCausalLM):
    config_class = EvilConfig
'''


def _folder_with_code(tmp_path, tiny_model_dir):
    """A downloaded-looking model folder: auto_map -> its own .py, and its saved config asks to trust that code."""
    folder = tmp_path / "downloaded"
    shutil.copytree(tiny_model_dir, folder)
    marker = tmp_path / "marker.txt"
    (folder / "evil.py").write_text(EVIL_CODE.format(marker=str(marker)), encoding="utf-8")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "rlhf_time_config.yaml").write_text(yaml.safe_dump({"trust_remote_code": True, "max_new_tokens": 2}))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n", encoding="utf-8")
    return folder, marker, prompts


def test_predict_ignores_trust_remote_code_from_the_model_folder(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    folder, marker, prompts = _folder_with_code(tmp_path, tiny_model_dir)
    output = tmp_path / "out.jsonl"
    assert main(["predict", str(folder), "--input", str(prompts), "--output", str(output)]) == 0
    assert output.is_file() and not marker.exists()


def test_predict_runs_folder_code_when_the_user_grants_it(tmp_path, tiny_model_dir, monkeypatch):
    """The control: the same folder's code does run with the user's own trust_remote_code=true."""
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    folder, marker, prompts = _folder_with_code(tmp_path, tiny_model_dir)
    output = tmp_path / "out.jsonl"
    assert main(["predict", str(folder), "--input", str(prompts), "--output", str(output), "trust_remote_code=true"]) == 0
    assert marker.read_text() == "code from the model folder ran"
