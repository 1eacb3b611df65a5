"""Training from parquet / save_to_disk / Hub-style folders, continued pre-training on text, and mixtures."""

import json

import datasets
import pytest
import torch

from rlhf_time import SFTrainer
from rlhf_time.data.quickstart import TRAIN_FILE
from tests.conftest import write_jsonl
from tests.trainer.helpers import tiny_config, train_losses, weights

RECORDS = [json.loads(line) for line in TRAIN_FILE.read_text(encoding="utf-8").splitlines()[:32]]


def _write(kind: str, folder) -> str:
    table = datasets.Dataset.from_list(RECORDS)
    if kind == "parquet":
        table.to_parquet(str(folder / "train.parquet"))
        return str(folder / "train.parquet")
    if kind == "save_to_disk":
        datasets.DatasetDict({"train": table, "test": table.select(range(4))}).save_to_disk(str(folder / "saved"))
        return str(folder / "saved")
    (folder / "hub" / "data").mkdir(parents=True)
    table.to_parquet(str(folder / "hub" / "data" / "train-00000-of-00001.parquet"))
    return str(folder / "hub")


@pytest.fixture(scope="module")
def jsonl_losses(tmp_path_factory, tiny_model_dir):
    tmp_path = tmp_path_factory.mktemp("jsonl")
    path = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    trainer = SFTrainer(tiny_config(tmp_path, tiny_model_dir, train_file=str(path), eval_file=None, max_steps=3,
                                    logging_steps=1))
    trainer.train()
    return train_losses(trainer.run_dir / "metrics.jsonl")


@pytest.mark.parametrize("kind", ["parquet", "save_to_disk", "hub_folder"])
def test_datasets_sources_train_exactly_as_the_jsonl(tmp_path, tiny_model_dir, jsonl_losses, kind):
    source = _write(kind, tmp_path)
    trainer = SFTrainer(tiny_config(tmp_path, tiny_model_dir, train_file=source, eval_file=None, max_steps=3,
                                    logging_steps=1))
    trainer.train()
    assert train_losses(trainer.run_dir / "metrics.jsonl") == jsonl_losses


def test_eval_split_of_the_train_data_set(tmp_path, tiny_model_dir):
    source = _write("save_to_disk", tmp_path)
    trainer = SFTrainer(tiny_config(tmp_path, tiny_model_dir, train_file=source, eval_file=None, eval_split="test",
                                    max_steps=1))
    assert len(trainer.train_dataset) == 32 and len(trainer.eval_dataset) == 4
    assert trainer.evaluate()["eval_tokens"] > 0


def test_continued_pretraining_trains_on_every_token(tmp_path, tiny_model_dir):
    texts = [f"{r['prompt']} {r['response']}" for r in RECORDS]
    path = write_jsonl(tmp_path / "text.jsonl", [{"body": t} for t in texts])
    trainer = SFTrainer(tiny_config(tmp_path, tiny_model_dir, train_file=str(path), eval_file=None,
                                    data_format="text", columns={"text": "body"}, max_steps=2))
    assert trainer.config.packing
    stats = trainer.train_dataset.stats
    assert stats.target_tokens == stats.total_tokens - stats.examples  # all but each example's first token
    batch = trainer.collate(list(range(8)), trainer.train_dataset)
    # every position of every packed example is a target, except the first token of each example
    assert int((batch["labels"] != -100).sum()) == sum(len(trainer.train_dataset[i]["input_ids"]) - 1 for i in range(8))
    before = weights(trainer.model)
    trainer.train()
    after = weights(trainer.model)
    assert all(not torch.equal(before[name], after[name]) for name in before)


def test_mixture_trains_from_both_sources(tmp_path, tiny_model_dir):
    first = write_jsonl(tmp_path / "a.jsonl", RECORDS[:16])
    datasets.Dataset.from_list(RECORDS[16:]).to_parquet(str(tmp_path / "b.parquet"))
    trainer = SFTrainer(tiny_config(tmp_path, tiny_model_dir, train_file=[str(first), str(tmp_path / "b.parquet")],
                                    mix_weights=[0.25, 0.75], eval_file=None, max_steps=1))
    assert len(trainer.train_dataset) == 32
    trainer.train()
