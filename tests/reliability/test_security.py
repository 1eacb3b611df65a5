"""Code shipped inside a model folder runs only when the user asks for it (command line or their own config)."""

import json
import os
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


EVIL_TOKENIZER = '''
from pathlib import Path
Path({marker!r}).write_text("code from the adapter folder ran")
from transformers import PreTrainedTokenizerFast
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
'''


def _adapter_with_tokenizer_code(tmp_path, tiny_model_dir):
    """A LoRA adapter folder whose tokenizer_config.json maps AutoTokenizer to its own .py, and whose saved
    rlhf_time_config.yaml asks to trust it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = tmp_path / "adapter"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(adapter)
    marker = tmp_path / "marker.txt"
    (adapter / "evil.py").write_text(EVIL_TOKENIZER.format(marker=str(marker)), encoding="utf-8")
    tokenizer_config = json.loads((adapter / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    (adapter / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (adapter / "rlhf_time_config.yaml").write_text(yaml.safe_dump({"trust_remote_code": True}))
    return adapter, marker


def test_export_ignores_trust_remote_code_from_the_adapter_folder(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    adapter, marker = _adapter_with_tokenizer_code(tmp_path, tiny_model_dir)
    main(["export", str(adapter), str(tmp_path / "merged")])  # merged with the stock tokenizer, or refused
    assert not marker.exists()


def test_export_runs_adapter_code_when_the_user_grants_it(tmp_path, tiny_model_dir, monkeypatch):
    """The control: --trust-remote-code on the command line does run the same folder's code."""
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    adapter, marker = _adapter_with_tokenizer_code(tmp_path, tiny_model_dir)
    assert main(["export", str(adapter), str(tmp_path / "merged"), "--trust-remote-code"]) == 0
    assert marker.read_text() == "code from the adapter folder ran"


def test_chat_and_eval_ignore_trust_remote_code_from_the_model_folder(tmp_path, tiny_model_dir, monkeypatch):
    from rlhf_time.data.quickstart import EVAL_FILE

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    folder, marker, _ = _folder_with_code(tmp_path, tiny_model_dir)
    monkeypatch.setattr("sys.stdin", open(os.devnull))
    main(["chat", str(folder)])
    assert not marker.exists()
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({"model_name": str(folder), "eval_file": str(EVAL_FILE), "max_eval_samples": 4,
                                      "report_to": "none", "output_dir": str(tmp_path / "out")}))
    main(["eval", str(config)])
    assert not marker.exists()
