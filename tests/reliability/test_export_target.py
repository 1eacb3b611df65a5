"""`rlhf-time export ADAPTER TARGET` never removes anything it did not create: a target that is a file, is not
empty, is the working directory, or is / holds / lies inside the adapter is refused in one line (exit 2) before any
model loads; a new or empty folder gets the merged model with the permissions the umask gives any saved file."""

import os
import stat

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_time.cli import main


@pytest.fixture
def run_with_adapter(tmp_path, tiny_model_dir):
    """A run folder as training leaves it: checkpoints, metrics and the LoRA adapter in final/."""
    from peft import LoraConfig, get_peft_model

    run = tmp_path / "runs" / "x"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(run / "final")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(run / "final")
    (run / "checkpoint-1").mkdir()
    (run / "checkpoint-1" / "trainer_state.json").write_text("{}")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    return run


def _tree(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*"))


def _refused(capsys, args, phrase):
    assert main(["export", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: export target") and phrase in err, err


def test_export_refuses_the_run_folder_that_holds_the_adapter(run_with_adapter, capsys):
    before = _tree(run_with_adapter)
    _refused(capsys, [str(run_with_adapter / "final"), str(run_with_adapter)], "contains the adapter folder")
    assert _tree(run_with_adapter) == before


def test_export_refuses_the_working_directory(run_with_adapter, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    before = _tree(tmp_path)
    _refused(capsys, [str(run_with_adapter / "final"), "."], "contains the adapter folder")
    assert _tree(tmp_path) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    _refused(capsys, [str(run_with_adapter / "final"), "."], "is the working directory")
    assert empty.is_dir() and not any(empty.iterdir())


@pytest.mark.parametrize("where, phrase", [("final", "is the adapter folder itself"),
                                           ("final/merged", "is inside the adapter folder")])
def test_export_refuses_the_adapter_folder_and_folders_inside_it(run_with_adapter, capsys, where, phrase):
    before = _tree(run_with_adapter)
    _refused(capsys, [str(run_with_adapter / "final"), str(run_with_adapter / where)], phrase)
    assert _tree(run_with_adapter) == before


def test_export_refuses_a_folder_holding_a_users_file_and_a_file(run_with_adapter, tmp_path, capsys):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "thesis.tex").write_text("years of work")
    _refused(capsys, [str(run_with_adapter / "final"), str(target)], "exists and is not empty")
    assert (target / "thesis.tex").read_text() == "years of work"
    file = tmp_path / "model.bin"
    file.write_text("a file")
    _refused(capsys, [str(run_with_adapter / "final"), str(file)], "is a file")
    assert file.read_text() == "a file"


def test_export_into_an_empty_or_new_folder_gets_the_umask_permissions(run_with_adapter, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    old = os.umask(0o027)
    try:
        assert main(["export", str(run_with_adapter / "final"), str(empty)]) == 0
        assert main(["export", str(run_with_adapter / "final"), str(tmp_path / "new")]) == 0
    finally:
        os.umask(old)
    for folder in (empty, tmp_path / "new"):
        assert AutoModelForCausalLM.from_pretrained(folder) is not None
        assert stat.S_IMODE(folder.stat().st_mode) == 0o750
        files = [p for p in folder.iterdir() if p.is_file()]
        assert files and {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o640}, folder
