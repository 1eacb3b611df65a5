"""report_to: every tracker receives the same scalars, the resolved config and the final summary, read back with
each tracker's own reader (TensorBoard's EventAccumulator, the W&B record schema, MLflow's client, SwanLab's
data store), compared with metrics.jsonl."""

import glob
import json
import math
import struct

import pytest

from rlhf_time import SFTrainer
from rlhf_time.config import ConfigError, TrainingConfig
from rlhf_time.errors import RlhfTimeError

from .helpers import tiny_config


def test_report_to_accepts_a_list_a_comma_string_or_none():
    assert TrainingConfig(report_to="wandb,mlflow").report_to == ["wandb", "mlflow"]
    assert TrainingConfig(report_to=["swanlab", "tensorboard"]).report_to == ["swanlab", "tensorboard"]
    assert TrainingConfig(report_to="none").report_to == []
    assert TrainingConfig(report_to=None).report_to == []
    assert TrainingConfig().report_to == ["tensorboard"]
    with pytest.raises(ConfigError, match="report_to"):
        TrainingConfig(report_to=["comet"])


def test_a_missing_tracker_package_is_named_before_the_model_loads(tmp_path, tiny_model_dir, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(RlhfTimeError, match=r"report_to=wandb needs the wandb package: pip install wandb"):
        SFTrainer(tiny_config(tmp_path, tiny_model_dir, report_to=["wandb"], model_name=str(tmp_path / "absent")))


def _expected(run_dir):
    """{metric: {step: value}} of metrics.jsonl (finite values), the reference every tracker must match."""
    expected = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key, value in row.items():
            if key != "step" and math.isfinite(value):
                expected.setdefault(key, {})[row["step"]] = value
    return expected


def _leveldb_records(data: bytes, header: int = 7, block: int = 32768) -> list[bytes]:
    """Records of a W&B run file: a 7-byte file header, then the LevelDB log format (32 KiB blocks, 7-byte
    record headers crc32/length/type; types 1 = full, 2/3/4 = first/middle/last fragment)."""
    position, records, pending = header, [], b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # block trailer padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        position += 7
        pending += data[position : position + length]
        position += length
        if kind in (1, 4):
            records.append(pending)
            pending = b""
    return records


def _read_wandb(run_dir):
    from wandb.proto import wandb_internal_pb2

    [path] = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    history, config, summary = {}, {}, {}
    for raw in _leveldb_records(open(path, "rb").read()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            step = items["_step"]
            for key, value in items.items():
                if not key.startswith("_"):
                    history.setdefault(key, {})[step] = value
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "summary":
            summary.update({"/".join(item.nested_key) or item.key: json.loads(item.value_json)
                            for item in record.summary.update})
    return history, config, summary


def _read_mlflow(output_dir):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(output_dir / "mlruns").resolve().as_uri())
    [experiment] = [e for e in client.search_experiments() if e.name == "rlhf_time"]
    [run] = client.search_runs([experiment.experiment_id])
    history = {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
               for key in run.data.metrics}
    return history, run.data.params, run.info.run_name


def _read_swanlab(output_dir):
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    [path] = glob.glob(str(output_dir / "swanlog" / "run-*" / "run-*.swanlab"))
    reader = DataStoreReader()
    reader.open(path)
    history = {}
    for raw in reader:
        record = Record()
        record.ParseFromString(raw)
        if record.HasField("scalar"):
            history.setdefault(record.scalar.key, {})[record.scalar.step] = record.scalar.value.number
    [config_file] = glob.glob(str(output_dir / "swanlog" / "run-*" / "files" / "config.yaml"))
    return history, open(config_file, encoding="utf-8").read()


def test_every_tracker_gets_the_same_scalars_config_and_summary(tmp_path, tiny_model_dir, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("SWANLAB_MODE", raising=False)
    config = tiny_config(tmp_path, tiny_model_dir, max_steps=4, logging_steps=2, eval_strategy="steps", eval_steps=4,
                         report_to=["tensorboard", "wandb", "mlflow", "swanlab"], experiment_name="tracked")
    trainer = SFTrainer(config)
    results = trainer.train()
    expected = _expected(trainer.run_dir)
    logged = {key: steps for key, steps in expected.items() if not key.startswith("summary/")}
    assert set(logged["train/loss"]) == {2, 4} and set(logged["eval/loss"]) == {4}
    output_dir = tmp_path / "outputs"

    events = EventAccumulator(str(trainer.run_dir / "tensorboard"))
    events.Reload()
    tensorboard = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}

    wandb_history, wandb_config, wandb_summary = _read_wandb(trainer.run_dir)
    mlflow_history, mlflow_params, mlflow_run_name = _read_mlflow(output_dir)
    swanlab_history, swanlab_config = _read_swanlab(output_dir)

    for name, history in (("tensorboard", tensorboard), ("wandb", wandb_history), ("mlflow", mlflow_history),
                          ("swanlab", swanlab_history)):
        for key, steps in expected.items():
            assert key in history, (name, key)
            assert set(history[key]) == set(steps), (name, key)
            for step, value in steps.items():
                assert history[key][step] == pytest.approx(value, rel=1e-6, abs=1e-9), (name, key, step)

    # The final summary reached every tracker (checked above as summary/* scalars at the last step) ...
    assert expected["summary/global_step"] == {4: 4.0}
    assert expected["summary/train_loss"][4] == pytest.approx(results["train_loss"])
    assert wandb_summary["summary/global_step"] == 4
    # ... and so did the resolved config.
    assert wandb_config["learning_rate"] == config.learning_rate and wandb_config["experiment_name"] == "tracked"
    assert float(mlflow_params["learning_rate"]) == config.learning_rate and mlflow_run_name == "tracked"
    assert "learning_rate" in swanlab_config and "experiment_name" in swanlab_config
    [config_text] = events.Tensors("config/text_summary")
    stored = config_text.tensor_proto.string_val[0].decode()
    assert f"learning_rate: {config.learning_rate}" in stored and "experiment_name: tracked" in stored
    assert len(list((trainer.run_dir / "tensorboard").iterdir())) == 1  # one events file: one run in TensorBoard
