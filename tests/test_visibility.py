"""What users see: API log lines without any logging set-up, lines that do not tear progress bars, the
resume line, `--version`, and no traceback when the reader of stdout goes away."""

import logging
import subprocess
import sys

import pytest
from tqdm import tqdm

from rlhf_time import SFTrainer, __version__
from rlhf_time.cli import main

from .trainer.helpers import tiny_config


def test_api_prints_log_lines_without_any_logging_setup(tmp_path, tiny_model_dir, capfd):
    # pytest's own capture handlers sit on the root logger; nothing else configures logging here.
    trainer = SFTrainer(tiny_config(tmp_path, tiny_model_dir, max_steps=2, logging_steps=1))
    trainer.train()
    err = capfd.readouterr().err
    assert "trainable of" in err and "train data: 48 examples" in err
    assert "step 1 | train/loss" in err and "step 2 | train/loss" in err


def test_hub_download_bars_stay_on(tmp_path, tiny_model_dir, monkeypatch):
    from huggingface_hub.utils import are_progress_bars_disabled

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    SFTrainer(tiny_config(tmp_path, tiny_model_dir, train_file=None, eval_file=None))
    assert not are_progress_bars_disabled()


def test_a_configured_root_logger_gets_each_line_once_and_ours_stays_quiet(capfd):
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    root = logging.getLogger()
    handler = Collect()
    root.addHandler(handler)
    try:
        logging.getLogger("rlhf_time").info("only once")
    finally:
        root.removeHandler(handler)
    assert records == ["only once"]
    assert "only once" not in capfd.readouterr().err
    logging.getLogger("rlhf_time").info("back on stderr")
    assert "back on stderr" in capfd.readouterr().err


def test_log_lines_do_not_tear_a_progress_bar(capfd):
    bar = tqdm(total=10, desc="train", file=sys.stderr, mininterval=0)
    bar.update(3)
    logging.getLogger("rlhf_time").info("eval: eval_loss=1.0")
    bar.update(1)
    bar.close()
    err = capfd.readouterr().err
    [line] = [line for line in err.split("\n") if "eval: eval_loss=1.0" in line]
    # tqdm clears the bar (carriage return) before the message, so the message starts its own visible line.
    visible = line.split("\r")[-1]
    assert "train:" not in visible and visible.endswith("eval: eval_loss=1.0")


def test_resuming_always_logs_where_from(tmp_path, tiny_model_dir, capfd):
    SFTrainer(tiny_config(tmp_path, tiny_model_dir, max_steps=2, save_strategy="steps", save_steps=2)).train()
    capfd.readouterr()
    resumed = SFTrainer(tiny_config(tmp_path, tiny_model_dir, max_steps=3, resume_from_checkpoint="latest"))
    resumed.train()
    err = capfd.readouterr().err
    assert f"resumed from {tmp_path / 'outputs' / 'run' / 'checkpoint-2'} at step 2" in err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"rlhf-time {__version__}"


def test_closed_stdout_pipe_gives_no_traceback():
    # The reader closes the pipe before the command writes (as `| head` does once it has its lines).
    process = subprocess.Popen([sys.executable, "-m", "rlhf_time", "train", "--help-config"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()
    err = process.stderr.read()
    process.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_tokenisation_evaluation_and_generation_show_progress_bars(tmp_path, tiny_model_dir, capfd):
    # 2,000 training records (bars start at 1,000), an eval set of several batches, prompts in several batches.
    trainer = SFTrainer(tiny_config(tmp_path, tiny_model_dir, max_train_samples=None, disable_progress_bar=False,
                                    eval_batch_size=4))
    trainer.evaluate()
    trainer.predict(["1", "2", "3"], max_new_tokens=2, batch_size=1)
    err = capfd.readouterr().err
    assert "tokenize: " in err and "eval: " in err and "generate: " in err
    quiet = SFTrainer(tiny_config(tmp_path / "quiet", tiny_model_dir, max_train_samples=None, eval_batch_size=4))
    quiet.evaluate()
    quiet.predict(["1", "2", "3"], max_new_tokens=2, batch_size=1)
    err = capfd.readouterr().err
    assert "tokenize: " not in err and "eval: " in err and "eval: 100%" not in err and "generate: " not in err
