"""Load dtype (bf16 frozen base, float32 trained weights), 4-bit QLoRA, and models from a ModelScope cache."""

import shutil

import pytest
import torch

from rlhf_time import RewardTrainer, SFTrainer, TrainingConfig
from rlhf_time.config import ConfigError
from rlhf_time.models.precision import load_dtype
from tests.conftest import write_jsonl
from tests.trainer.helpers import tiny_config, weights


def _train(trainer):
    before = weights(trainer.model)
    trainer.train()
    return before, weights(trainer.model)


def test_lora_holds_the_base_in_bf16_and_trains_float32_adapters(tmp_path, tiny_model_dir):
    trainer = SFTrainer(tiny_config(tmp_path, tiny_model_dir, use_lora=True, model_dtype="bfloat16", max_steps=3,
                                    learning_rate=1e-2))
    params = dict(trainer.model.named_parameters())
    lora = {n for n, p in params.items() if "lora_" in n}
    assert lora and all(params[n].dtype == torch.float32 and params[n].requires_grad for n in lora)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for n, p in params.items() if n not in lora)
    before, after = _train(trainer)
    for name in before:
        if name in lora and "lora_B" in name:  # lora_A changes too, but lora_B starts at zero: it must move
            assert not torch.equal(before[name], after[name]), name
        elif name not in lora:
            assert torch.equal(before[name], after[name]), name
    assert all(after[n].dtype == torch.float32 for n in lora)


def test_frozen_layers_in_bf16_between_float32_trained_parts(tmp_path, tiny_model_dir):
    trainer = SFTrainer(tiny_config(tmp_path, tiny_model_dir, freeze_layers=[0], model_dtype="bfloat16", max_steps=2))
    frozen = {n for n, p in trainer.model.named_parameters() if not p.requires_grad}
    assert frozen and all(".layers.0." in n for n in frozen)
    for name, p in trainer.model.named_parameters():
        assert p.dtype == (torch.bfloat16 if name in frozen else torch.float32), name
    before, after = _train(trainer)
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    assert all(not torch.equal(before[n], after[n]) for n in before if n not in frozen)


def test_reward_model_lora_bf16_keeps_its_head_in_float32(tmp_path, tiny_model_dir):
    pairs = [{"prompt": f"q{i}", "chosen": f"good answer {i}", "rejected": f"bad {i}"} for i in range(16)]
    path = write_jsonl(tmp_path / "p.jsonl", pairs)
    trainer = RewardTrainer(tiny_config(tmp_path, tiny_model_dir, stage="rm", train_file=str(path), eval_file=None,
                                        use_lora=True, model_dtype="bfloat16", max_steps=2))
    head = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert head and all(p.dtype == torch.float32 for p in head.values())
    before, after = _train(trainer)
    assert all(not torch.equal(before[n], after[n]) for n in head)


def test_auto_dtype(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert load_dtype(TrainingConfig(use_lora=True), cuda) == torch.bfloat16
    assert load_dtype(TrainingConfig(freeze_layers=[0]), cuda) == torch.bfloat16
    assert load_dtype(TrainingConfig(), cuda) == torch.float32  # full fine-tuning: float32 master weights
    assert load_dtype(TrainingConfig(use_lora=True), cpu) == torch.float32
    assert load_dtype(TrainingConfig(model_dtype="float16"), cpu) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert load_dtype(TrainingConfig(use_lora=True), cuda) == torch.float32


def test_quantization_needs_lora():
    with pytest.raises(ConfigError, match="quantization 4bit trains LoRA adapters .* set use_lora: true"):
        TrainingConfig(quantization="4bit")
    with pytest.raises(ConfigError, match="cannot be combined with distributed fsdp"):
        TrainingConfig(quantization="4bit", use_lora=True, distributed="fsdp")


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_qlora_trains(tmp_path, tiny_model_dir, bits):
    """Runs on CPU with bitsandbytes' CPU backend (bitsandbytes >= 0.48); on a GPU machine the same test runs there."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    trainer = SFTrainer(tiny_config(tmp_path, tiny_model_dir, use_lora=True, quantization=bits, max_steps=3,
                                    learning_rate=1e-2))
    kind = bnb.nn.Linear4bit if bits == "4bit" else bnb.nn.Linear8bitLt
    quantised = [m for m in trainer.model.modules() if isinstance(m, kind)]
    assert len(quantised) == 7 * len(trainer.model.base_model.model.model.layers)  # q k v o gate up down
    if bits == "4bit":  # QLoRA: NF4 with double quantisation
        assert all(m.weight.quant_type == "nf4" and m.weight.quant_state.nested for m in quantised)
    lora = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n and p.dtype == torch.float32 for n, p in lora.items())
    packed = [m.weight.detach().clone() for m in quantised]
    before, after = _train(trainer)
    assert all(not torch.equal(before[n], after[n]) for n in lora if "lora_B" in n)
    assert all(torch.equal(old, m.weight.detach()) for old, m in zip(packed, quantised))  # base untouched

# --------------------------------------------------------------------------------------------- ModelScope
@pytest.mark.parametrize("layout", ["models/Org--Tiny-0.5B/snapshots/0123abc", "models/Org/Tiny-0___5B"])
def test_modelscope_id_resolves_from_the_local_cache(tmp_path, tiny_model_dir, monkeypatch, layout):
    """A model pre-filled in the ModelScope cache (current and legacy layouts) loads offline and trains."""
    pytest.importorskip("modelscope")
    cache = tmp_path / "modelscope"
    shutil.copytree(tiny_model_dir, cache / layout)
    monkeypatch.setenv("MODELSCOPE_CACHE", str(cache))
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", "http://127.0.0.1:9")  # were the cache missed, the download would fail fast
    trainer = SFTrainer(tiny_config(tmp_path, "Org/Tiny-0.5B", model_source="modelscope", max_steps=1))
    reference = SFTrainer(tiny_config(tmp_path / "ref", tiny_model_dir, max_steps=1))
    assert all(torch.equal(a, b) for a, b in zip(trainer.model.state_dict().values(), reference.model.state_dict().values()))
    trainer.train()


def test_modelscope_id_not_cached_offline_is_one_line(tmp_path, monkeypatch):
    pytest.importorskip("modelscope")
    from rlhf_time.errors import RlhfTimeError
    from rlhf_time.models import resolve_model_path

    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path))
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(RlhfTimeError) as error:
        resolve_model_path("Org/Missing", "modelscope")
    assert "\n" not in str(error.value) and "'Org/Missing': not in the ModelScope cache" in str(error.value)


def test_hub_downloads_show_progress_even_after_the_trainer_quiets_transformers(monkeypatch):
    import transformers
    from huggingface_hub.utils import are_progress_bars_disabled

    from rlhf_time.models import loading

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    transformers.utils.logging.disable_progress_bar()  # what Trainer does
    seen = []

    class Factory:
        @staticmethod
        def from_pretrained(source, **kwargs):
            seen.append(are_progress_bars_disabled())
            return source

    monkeypatch.setattr(loading, "_hub_snapshot_or_fail", lambda repo_id: repo_id)
    assert loading._from_pretrained(Factory, "Org/Name", False) == "Org/Name"
    assert seen == [False] and are_progress_bars_disabled()  # on while loading, restored after


def test_modelscope_download_has_a_bytes_progress_bar_per_file(monkeypatch):
    modelscope = pytest.importorskip("modelscope")
    from modelscope.hub.callback import TqdmCallback

    from rlhf_time.models.modelscope import modelscope_snapshot

    calls = []

    def fake_snapshot_download(model_id, **kwargs):
        calls.append(kwargs)
        if kwargs.get("local_files_only"):
            raise FileNotFoundError("not cached")
        return "/downloaded/" + model_id

    monkeypatch.setattr(modelscope, "snapshot_download", fake_snapshot_download)
    assert modelscope_snapshot("Org/Name") == "/downloaded/Org/Name"
    assert calls == [{"local_files_only": True}, {"progress_callbacks": [TqdmCallback]}]
