"""Hostile inputs of issue 27: each ends as one line naming the field or path and its real cause (exit code 2, no
traceback), and a model that is not what the config says is refused before it trains or scores."""

import json
import re
import shutil
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_time.cli import main
from rlhf_time.config import ConfigError, TrainingConfig

from .test_error_contract import _config, one_error_line

REPO = Path(__file__).resolve().parents[2]
PAIRS = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(8)]


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("field, value, shown", [
    ("rollout.reward_weights", "[.nan]", "rollout.reward_weights"), ("mix_weights", "[1.0, .inf]", "mix_weights")])
def test_every_number_in_the_config_is_finite_nested_too(tmp_path, tiny_model_dir, capsys, field, value, shown):
    extra = ({"stage": "grpo"} if field == "rollout.reward_weights"
             else {"train_file": [str(_jsonl(tmp_path / "a.jsonl", PAIRS))] * 2, "data_format": "auto"})
    path = _config(tmp_path, tiny_model_dir, **extra)
    with open(path, "a", encoding="utf-8") as handle:
        if field == "rollout.reward_weights":
            handle.write(f"rollout:\n  reward_funcs: [exact_match]\n  reward_weights: {value}\n")
        else:
            handle.write(f"{field}: {value}\n")
    line = one_error_line(capsys, ["train", path])
    assert shown in line and "finite" in line


def test_a_config_error_found_on_assignment_names_the_reason_not_the_whole_config():
    config = TrainingConfig(use_lora=True)
    with pytest.raises(ConfigError) as caught:
        config.freeze_layers = [0]
    message = str(caught.value)
    assert "freeze_layers" in message and "use_lora" in message
    assert "TrainingConfig(" not in message and len(message) < 300


@pytest.mark.parametrize("stage, data_format, fix", [("sft", "preference", "stage rm or dpo"),
                                                     ("dpo", "prompt_response", "data_format: preference")])
def test_a_data_format_that_does_not_suit_the_stage_says_so(tmp_path, tiny_model_dir, capsys, stage, data_format, fix):
    data = _jsonl(tmp_path / "pairs.jsonl", PAIRS)
    line = one_error_line(capsys, ["train", _config(tmp_path, tiny_model_dir, train_file=data, stage=stage,
                                                    data_format=data_format)])
    assert f"data_format {data_format} does not suit stage '{stage}'" in line and fix in line


# ------------------------------------------------------------------------------------------ commands
@pytest.mark.parametrize("command, needed", [("eval", "CONFIG_YAML"), ("predict", "MODEL_DIR"), ("chat", "MODEL_DIR")])
def test_a_command_without_arguments_names_what_it_needs(capsys, command, needed):
    with pytest.raises(SystemExit) as exit_code:
        main([command])
    err = capsys.readouterr().err
    assert exit_code.value.code == 2 and "Traceback" not in err
    assert needed in err.splitlines()[-1] and "overrides" not in err.splitlines()[-1]


def test_export_of_a_missing_folder_says_not_found(tmp_path, capsys):
    line = one_error_line(capsys, ["export", str(tmp_path / "runs" / "nope" / "final"), str(tmp_path / "merged")])
    assert "runs/nope/final" in line and "not found" in line and "not a LoRA" not in line


# ------------------------------------------------------------------------ models not what the config says
def _prompts(tmp_path):
    return _jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"{i} + 1 =", "answer": str(i + 1)} for i in range(8)])


def _option(field, value):
    """{section: {name: value}} for a dotted field such as rollout.reward_model."""
    section, name = field.split(".")
    return {section: {name: value}}


@pytest.mark.parametrize("stage, field", [("grpo", "rollout.reward_model"), ("ppo", "rollout.reward_model"),
                                          ("ppo", "ppo.value_model")])
def test_an_sft_folder_as_a_reward_or_value_model_is_refused(tmp_path, tiny_model_dir, capsys, stage, field):
    data = _prompts(tmp_path)
    rollout = {"reward_funcs": [] if field == "rollout.reward_model" else ["exact_match"]}
    settings = dict(stage=stage, train_file=data, eval_file=data, **_option(field, str(tiny_model_dir)))
    settings["rollout"] = {**settings.get("rollout", {}), **rollout}
    line = one_error_line(capsys, ["train", _config(tmp_path, tiny_model_dir, **settings)])
    assert f"{field} {tiny_model_dir}: not a reward model" in line and "stage=rm" in line
    assert not (tmp_path / "out" / "run" / "final").exists()


def test_eval_of_a_reward_model_config_refuses_an_sft_folder(tmp_path, tiny_model_dir, capsys):
    pairs = _jsonl(tmp_path / "pairs.jsonl", PAIRS)
    line = one_error_line(capsys, ["eval", _config(tmp_path, tiny_model_dir, stage="rm", eval_file=pairs)])
    assert f"model_name {tiny_model_dir}: not a reward model" in line


@pytest.mark.parametrize("stage, field", [("dpo", "dpo.ref_model"), ("kd", "kd.teacher_model"),
                                          ("grpo", "rollout.reward_model"), ("ppo", "ppo.value_model")])
@pytest.mark.parametrize("where", ["local", "hub"])
def test_a_missing_auxiliary_model_is_named_by_its_field(tmp_path, tiny_model_dir, capsys, monkeypatch, stage, field, where):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub id that is not cached cannot be fetched: say so at once
    missing = str(tmp_path / "no-such-model") if where == "local" else "no-such-org/no-such-model"
    data = _jsonl(tmp_path / "pairs.jsonl", PAIRS) if stage == "dpo" else None
    settings = dict(stage=stage, **_option(field, missing))
    if stage in ("grpo", "ppo"):
        data = _prompts(tmp_path)
        settings.update(eval_file=data)
        settings["rollout"] = {**settings.get("rollout", {}), "reward_funcs": ["exact_match"]}
    line = one_error_line(capsys, ["train", _config(tmp_path, tiny_model_dir, **settings, **({"train_file": data} if data else {}))])
    assert field in line and missing in line and "model_name" not in line


def test_a_kd_teacher_with_fewer_embedding_rows_than_the_tokenizer_is_refused_before_training(tmp_path, tiny_model_dir,
                                                                                              capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = tmp_path / "teacher"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(len(AutoTokenizer.from_pretrained(tiny_model_dir)) - 100)
    model.save_pretrained(teacher)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(teacher)
    line = one_error_line(capsys,
                          ["train", _config(tmp_path, tiny_model_dir, stage="kd", kd={"teacher_model": str(teacher)})])
    assert f"kd.teacher_model {teacher}" in line and "rows" in line


def test_a_lora_adapter_folder_as_model_name_trains_in_full_from_base_plus_adapter(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlhf_time import SFTrainer

    from ..trainer.helpers import tiny_config

    lora = SFTrainer(tiny_config(tmp_path / "lora", tiny_model_dir, use_lora=True, max_steps=2))
    adapter = lora.run_dir / "final"
    lora.train()
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter).merge_and_unload()
    expected = reference.state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert any(not torch.equal(expected[name], base[name]) for name in expected)  # the adapter changes something

    full = SFTrainer(tiny_config(tmp_path / "full", tiny_model_dir, model_name=str(adapter), max_steps=1))
    start = {name: value.detach().clone() for name, value in full.model.state_dict().items()}
    assert start.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(start[name], value, msg=name)
    assert all(p.requires_grad for p in full.model.parameters())
    full.train()
    assert (full.run_dir / "final" / "model.safetensors").is_file()


# -------------------------------------------------------------------------------------------- noise
def test_a_lora_run_and_its_export_never_load_bitsandbytes(tmp_path, tiny_model_dir):
    """peft imports bitsandbytes when installed, whose CPU backend prints 'Failed to load CPU gemm_4bit_forward ...'
    and may contact the Hub: only a quantised run may load it. A fresh process, as a user's run starts."""
    pytest.importorskip("bitsandbytes")  # installed, as in the shared environment: the case that was noisy
    config = _config(tmp_path, tiny_model_dir, use_lora=True, save_strategy="no")
    script = (f"import sys\nfrom rlhf_time.cli import main\n"
              f"assert main(['train', {config!r}]) == 0\n"
              f"assert main(['export', {str(tmp_path / 'out' / 'run' / 'final')!r}, {str(tmp_path / 'merged')!r}]) == 0\n"
              f"print('bitsandbytes loaded:', 'bitsandbytes' in sys.modules)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "bitsandbytes loaded: False" in done.stdout
    assert "gemm_4bit" not in done.stderr and "trust_remote_code=True" not in done.stderr
    assert (tmp_path / "merged" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------ pickles
def _pickled_copy(source, target):
    """The model folder with its weights as a pickle only (pytorch_model.bin), as old hub repos ship them."""
    from safetensors.torch import load_file

    shutil.copytree(source, target)
    torch.save(load_file(target / "model.safetensors"), target / "pytorch_model.bin")
    (target / "model.safetensors").unlink()
    return target


@pytest.mark.parametrize("field", ["model_name", "kd.teacher_model", "dpo.ref_model"])
def test_a_model_folder_with_only_pickled_weights_is_refused(tmp_path, tiny_model_dir, capsys, field):
    pickled = str(_pickled_copy(tiny_model_dir, tmp_path / "pickled"))
    settings = {"model_name": pickled} if field == "model_name" else _option(field, pickled)
    if field == "kd.teacher_model":
        settings["stage"] = "kd"
    if field == "dpo.ref_model":
        settings.update(stage="dpo", train_file=_jsonl(tmp_path / "pairs.jsonl", PAIRS))
    line = one_error_line(capsys, ["train", _config(tmp_path, tiny_model_dir, **settings)])
    assert f"{field} {pickled}" in line and "pytorch_model.bin" in line and "safetensors" in line


def test_export_refuses_a_base_with_pickled_weights(tmp_path, tiny_model_dir, capsys):
    pickled = _pickled_copy(tiny_model_dir, tmp_path / "pickled")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(pickled),
                                                              "peft_type": "LORA"}), encoding="utf-8")
    line = one_error_line(capsys, ["export", str(adapter), str(tmp_path / "merged")])
    assert str(pickled) in line and "pytorch_model.bin" in line
    assert not (tmp_path / "merged").exists()


# ---------------------------------------------------------------------------------------- outputs
def test_predict_output_that_is_a_folder_fails_before_the_model_loads(tmp_path, tiny_model_dir, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n", encoding="utf-8")
    folder = tmp_path / "predictions"
    folder.mkdir()
    line = one_error_line(capsys, ["predict", str(tiny_model_dir), "--input", str(prompts), "--output", str(folder)])
    assert str(folder) in line and "is a folder" in line
    assert list(folder.iterdir()) == []


def test_plot_output_that_is_a_file_says_so(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/loss": 1.0 / s}) + "\n" for s in (1, 2)),
                                       encoding="utf-8")
    blocker = tmp_path / "charts.png"
    blocker.write_text("not a folder", encoding="utf-8")
    line = one_error_line(capsys, ["plot", str(run), "--output", str(blocker)])
    assert str(blocker) in line and "is a file" in line
    assert blocker.read_text(encoding="utf-8") == "not a folder"


# ------------------------------------------------------------------------------- streaming and disks
def _conversations(count):
    return [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"reply {i}"}]}
            for i in range(count)]


def test_a_malformed_line_in_a_streamed_file_names_its_line(tmp_path, tiny_model_dir, capsys):
    lines = [json.dumps(r) for r in _conversations(40)]
    lines.insert(20, '{"messages": [broken')
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    line = one_error_line(capsys, ["train", _config(tmp_path, tiny_model_dir, train_file=str(data), streaming=True)])
    assert f"{data} line 21: malformed JSON" in line


def test_a_malformed_line_deep_in_a_stream_names_its_line_when_it_is_read(tmp_path, tiny_model_dir):
    """Past datasets' first block (so validation, which reads the first record, passes): the error comes from
    the read during training, still as the file's line."""
    from rlhf_time.data.streaming import SourceStream
    from rlhf_time.errors import RlhfTimeError

    padding = "x" * 400
    records = [{"messages": [{"role": "user", "content": f"q{i} {padding}"}, {"role": "assistant", "content": "a"}]}
               for i in range(40_000)]  # ~18 MB: several of datasets' JSON blocks
    data = tmp_path / "big.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records) + "{not json\n", encoding="utf-8")
    config = TrainingConfig(model_name=str(tiny_model_dir), train_file=str(data), streaming=True,
                            max_steps=1, eval_strategy="no", report_to="none")
    stream = SourceStream(str(data), config, rank=0, world_size=1, limit=None)
    assert stream.next().data["messages"][0]["content"].startswith("q0 ")
    with pytest.raises(RlhfTimeError, match=rf"^{data} line 40001: malformed JSON") as error:
        while stream.next() is not None:
            pass
    assert stream.read > 1000 and "\n" not in str(error.value)


def test_a_full_disk_while_writing_the_token_cache_is_one_line_and_leaves_nothing(tmp_path, tiny_model_dir, capsys,
                                                                                  monkeypatch):
    import errno

    from rlhf_time.data import token_store

    def add_on_a_full_disk(self, columns):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(token_store.TokenCacheWriter, "add", add_on_a_full_disk)
    line = one_error_line(capsys, ["train", _config(tmp_path, tiny_model_dir)])
    assert "cannot write the tokenised data cache (No space left on device" in line and "data_cache_dir" in line
    # No partial token cache to be read later (the validation marker of the data file is not one).
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and "validated" not in p.parts]


@pytest.mark.parametrize("save_strategy, kept", [("no", "No checkpoint was saved before this point"),
                                                 ("steps", "Earlier checkpoints are intact (latest checkpoint-")])
def test_a_full_disk_at_the_metrics_append_stops_in_one_line_saying_what_is_kept(tmp_path, tiny_model_dir, capsys,
                                                                                monkeypatch, save_strategy, kept):
    import errno
    import pathlib

    real_open, appends = pathlib.Path.open, []

    def open_on_a_disk_that_fills(self, mode="r", *args, **kwargs):
        if self.name == "metrics.jsonl" and "a" in mode:
            appends.append(self)
            if len(appends) == 2:  # step 1's row is written; step 2's append finds the disk full
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", open_on_a_disk_that_fills)
    line = one_error_line(capsys, ["train", _config(tmp_path, tiny_model_dir, max_steps=3, save_strategy=save_strategy,
                                                    save_steps=1)])
    assert re.search(r"metrics.jsonl: cannot append the metrics of step \d \(No space left on device\); training "
                     r"stopped", line), line
    assert kept in line


def test_a_full_disk_at_final_without_checkpoints_says_the_weights_are_lost(tmp_path, tiny_model_dir, monkeypatch):
    import errno

    from rlhf_time import SFTrainer
    from rlhf_time.errors import RlhfTimeError

    from ..trainer.helpers import tiny_config

    def save_on_a_full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    trainer = SFTrainer(tiny_config(tmp_path, tiny_model_dir, max_steps=1, max_train_samples=8, save_strategy="no"))
    monkeypatch.setattr(trainer.model, "save_pretrained", save_on_a_full_disk)
    with pytest.raises(RlhfTimeError) as error:
        trainer.train()
    message = str(error.value)
    assert "final: no space left on the device while writing the model" in message
    assert "No checkpoint was saved before this point, so the weights trained in this run are lost" in message
    assert "resume" not in message.split("lost")[0]



def test_a_folder_whose_run_failed_before_its_first_checkpoint_is_reused(tmp_path, tiny_model_dir, capsys,
                                                                         monkeypatch):
    """Nothing there to resume: the new run replaces the failed one's leftovers (logged), instead of sending the user
    to resume_from_checkpoint=latest, which finds no checkpoint."""
    config = _config(tmp_path, tiny_model_dir, max_steps=2, save_strategy="steps", save_steps=2)
    run_dir = tmp_path / "out" / "run"
    run_dir.mkdir(parents=True)
    for name, text in [("config.yaml", "stage: sft\n"), ("metrics.jsonl", '{"step": 1, "train/loss": 9.0}\n')]:
        (run_dir / name).write_text(text, encoding="utf-8")
    (run_dir / "tensorboard").mkdir()
    assert main(["train", config]) == 0, capsys.readouterr().err[-2000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(row.get("train/loss") != 9.0 for row in rows)  # the failed run's rows are gone
    assert (run_dir / "checkpoint-2").is_dir()
