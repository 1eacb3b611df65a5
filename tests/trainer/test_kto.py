"""KTO (`stage: kto`): the loss against its formula in float64, the data (unpaired records and pairs split in two),
the mismatched pairs of the KL reference point against an independent tokenisation, z_ref over the whole step
(unchanged by accumulation), and the per-example loss, the step loss and a 20-step curve against TRL 1.16's
KTOTrainer on identical token ids and weights."""

import copy
import json
import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from rlhf_time import KTOTrainer, TrainerCallback, TrainingConfig
from rlhf_time.data import load_dataset_of_kind
from rlhf_time.data.quickstart import make_preference_records, make_unpaired_records
from rlhf_time.loss import create_loss

from ..conftest import write_jsonl
from .helpers import (Recorder, approx_metrics, assert_resumed_mid_run_equals_uninterrupted, build_sharper_reference,
                      tiny_config, weights)
from .test_reward import EXAMPLES, preference_files


def test_the_losses_equal_their_formulas():
    policy = torch.tensor([-3.0, -7.5, -1.2, -9.0, -4.4], dtype=torch.float64)
    reference = torch.tensor([-3.5, -6.0, -1.0, -9.3, -4.4], dtype=torch.float64)
    desirable = torch.tensor([True, True, False, False, True])
    beta, kl, w_d, w_u = 0.3, 0.2, 1.5, 0.7
    r = policy - reference
    sigmoid = lambda x: 1 / (1 + torch.exp(-x))  # noqa: E731
    expected = torch.where(desirable, w_d * (1 - sigmoid(beta * (r - kl))), w_u * (1 - sigmoid(beta * (kl - r))))
    loss = create_loss("kto", beta=beta, desirable_weight=w_d, undesirable_weight=w_u, reduction="none")
    torch.testing.assert_close(loss(policy, reference, desirable, kl).double(), expected, rtol=1e-6, atol=1e-7)
    expected_apo = torch.where(desirable, w_d * (1 - sigmoid(beta * r)), w_u * sigmoid(beta * r))
    apo = create_loss("kto", beta=beta, desirable_weight=w_d, undesirable_weight=w_u, loss_type="apo_zero_unpaired",
                      reduction="none")
    torch.testing.assert_close(apo(policy, reference, desirable, kl).double(), expected_apo, rtol=1e-6, atol=1e-7)
    assert create_loss("kto")(policy, reference, desirable).item() == pytest.approx(
        (1 - sigmoid(0.1 * torch.where(desirable, r, -r))).mean().item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------------- data
def _unpaired_records():
    return [
        {"prompt": "把数字写成中文：12", "completion": "一二", "label": True},
        {"prompt": [{"role": "system", "content": "只写数字"}, {"role": "user", "content": "把数字写成中文：7"}],
         "completion": {"role": "assistant", "content": "九"}, "label": False},
        {"prompt": "把数字写成中文：305", "completion": [{"role": "assistant", "content": "三零五"}], "label": True},
    ]


def _templated(tokenizer, messages, generation_prompt=False):
    return tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                         return_dict=True)["input_ids"]


def test_unpaired_records_and_pairs_become_labelled_examples(tmp_path, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = TrainingConfig(stage="kto", model_name=str(tiny_model_dir), max_seq_length=64)
    unpaired = load_dataset_of_kind("unpaired", write_jsonl(tmp_path / "u.jsonl", _unpaired_records()), tokenizer,
                                    config)
    assert [row["label"] for row in unpaired] == [1.0, 0.0, 1.0]
    assert (unpaired.stats.desirable, unpaired.stats.undesirable) == (2, 1)
    assert unpaired.stats.summary().endswith("2 desirable, 1 undesirable")
    # Only the completion (and its end-of-turn token) is trained, tokenised as the chat template renders it.
    second = unpaired[1]
    prompt = [{"role": "system", "content": "只写数字"}, {"role": "user", "content": "把数字写成中文：7"}]
    full = _templated(tokenizer, [*prompt, {"role": "assistant", "content": "九"}])
    prompt_ids = _templated(tokenizer, prompt, generation_prompt=True)
    assert second["input_ids"] == full
    trained = [t for t in second["labels"] if t != -100]
    assert trained == tokenizer("九<|im_end|>", add_special_tokens=False)["input_ids"]
    assert all(label == -100 for label in second["labels"][: len(prompt_ids)])

    pairs = [{"prompt": "把数字写成中文：4", "chosen": "四", "rejected": "五"},
             {"prompt": "把数字写成中文：88", "chosen": "八八", "rejected": "八九"}]
    split = load_dataset_of_kind("unpaired", write_jsonl(tmp_path / "p.jsonl", pairs), tokenizer, config)
    # chosen replies first, then the rejected ones (TRL's unpair_preference_dataset order), one of each per pair
    assert [row["label"] for row in split] == [1.0, 1.0, 0.0, 0.0]
    replies = [tokenizer.decode([t for t in row["labels"] if t != -100]) for row in split]
    assert replies == ["四<|im_end|>", "八八<|im_end|>", "五<|im_end|>", "八九<|im_end|>"]
    assert (split.stats.desirable, split.stats.undesirable) == (2, 2)


def test_the_bundled_unpaired_split_is_the_generated_one():
    pairs = [json.loads(line) for line in (EXAMPLES / "preference_train.jsonl").read_text(encoding="utf-8").splitlines()]
    shipped = [json.loads(line) for line in (EXAMPLES / "kto_train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert shipped == make_unpaired_records(pairs, seed=12)
    assert sorted((r["prompt"], r["completion"], r["label"]) for r in shipped) == sorted(
        [(p["prompt"], p["chosen"], True) for p in pairs] + [(p["prompt"], p["rejected"], False) for p in pairs])
    assert all(a["prompt"] != b["prompt"] for a, b in zip(shipped, shipped[1:]))  # no pair stays together


def test_one_kind_only_runs_with_a_one_line_warning(tmp_path, tiny_model_dir, caplog):
    records = [r for r in _unpaired_records() if r["label"]] * 3
    config = tiny_config(tmp_path, tiny_model_dir, stage="kto", train_file=str(write_jsonl(tmp_path / "d.jsonl", records)),
                         eval_file=None, batch_size=2, max_steps=1)
    with caplog.at_level(logging.INFO, logger="rlhf_time"):
        trainer = KTOTrainer(config)
    warnings = [r.getMessage() for r in caplog.records if "warning" in r.getMessage()]
    assert warnings == ["warning: the train data has no undesirable examples (label false): KTO trains on one kind only"]
    assert math.isfinite(trainer.train()["train_loss"])


@pytest.mark.parametrize("record,expected", [
    ({"prompt": "p", "completion": "c", "label": "yes"}, "field 'label' must be true or false, got \"yes\""),
    ({"prompt": "p", "completion": "c", "label": 1}, "field 'label' must be true or false, got 1"),
    ({"prompt": "p", "label": True}, "missing field 'completion'"),
])
def test_bad_records_are_one_line_and_exit_2(tmp_path, capsys, record, expected):
    from ..reliability.test_error_contract import one_error_line

    good = {"prompt": "p", "completion": "c", "label": True}
    data = write_jsonl(tmp_path / "bad.jsonl", [good, record])
    line = one_error_line(capsys, ["train", str(Path(__file__).resolve().parents[2] / "examples" / "kto.yaml"),
                                   f"train_file={data}", f"output_dir={tmp_path}"])
    assert f"bad.jsonl line 2: {expected}" in line, line


# --------------------------------------------------------------------------------------- the KL estimate
def _trainer(tmp_path, model_dir, **overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    values = dict(stage="kto", batch_size=8, max_steps=20, learning_rate=3e-3, lr_scheduler_type="constant",
                  weight_decay=0.0, max_grad_norm=None, shuffle=False, group_by_length=False,
                  **preference_files(tmp_path, 16, 8))
    values.update(overrides)
    return KTOTrainer(tiny_config(tmp_path, model_dir, **values))


def test_each_prompt_meets_the_previous_completion(tmp_path, tiny_model_dir):
    trainer = _trainer(tmp_path, tiny_model_dir)
    dataset, tokenizer = trainer.train_dataset, trainer.tokenizer
    records = [json.loads(line) for line in Path(trainer.config.train_file).read_text(encoding="utf-8").splitlines()]
    # the data set holds the 16 chosen completions, then the 16 rejected ones
    examples = [(r["prompt"], r["chosen"]) for r in records] + [(r["prompt"], r["rejected"]) for r in records]
    indices = [0, 5, 16, 31]
    batch = trainer.collate(indices, dataset)
    for row, i in enumerate(indices):
        prompt, completion = examples[i][0], examples[(i - 1) % len(examples)][1]
        ids = _templated(tokenizer, [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}])
        mask = batch["kl_attention_mask"][row].bool()
        assert batch["kl_input_ids"][row][mask].tolist() == ids
        trained = [t for t in batch["kl_labels"][row].tolist() if t != -100]
        assert tokenizer.decode(trained) == completion + "<|im_end|>"


def _written_out_logps(model, ids, mask, labels):
    """Summed log-probs of the labelled tokens, from full logits in float64."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
    targets = labels[:, 1:]
    picked = F.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return (picked * (targets != -100)).sum(-1)


@pytest.fixture
def sharper_reference(tmp_path, tiny_model_dir):
    """A reference unlike the initial policy, so z_ref is positive from the first step."""
    return build_sharper_reference(tmp_path / "reference", tiny_model_dir)


def _train_watching_steps(trainer):
    """Train; returns (each step's prepared micro-batches, the logged losses and z_ref, the initial policy)."""
    steps = []
    original = trainer.prepare_step
    trainer.prepare_step = lambda batches, dataset: steps.append(batches) or original(batches, dataset)
    spy = KLSpy()
    trainer.callbacks.append(spy)
    initial = copy.deepcopy(trainer.model)
    trainer.train()
    return steps, spy, initial


class KLSpy(TrainerCallback):
    def __init__(self):
        self.kl, self.losses = [], []

    def on_step_end(self, trainer, metrics):
        self.kl.append(metrics["train/kl"])
        self.losses.append(metrics["train/loss"])


def test_z_ref_is_the_whole_step_mean_and_accumulation_leaves_it_unchanged(tmp_path, tiny_model_dir,
                                                                          sharper_reference):
    runs = {}
    for batch_size, accumulation in ((8, 1), (2, 4)):
        trainer = _trainer(tmp_path / f"b{batch_size}", tiny_model_dir, batch_size=batch_size,
                           gradient_accumulation_steps=accumulation, max_steps=3, shuffle=True,
                           learning_rate=1.0, adam_epsilon=1.0,  # updates ~linear in the gradient: a mis-weighting shows
                           kto={"ref_model": str(sharper_reference)})
        steps, spy, initial = _train_watching_steps(trainer)
        runs[batch_size] = (spy, weights(trainer.model))
        if batch_size == 8:  # z_ref of step 1, written out: the mean over its 8 mismatched rows, clamped at 0
            batch = steps[0][0]
            kl_rows = (batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_labels"])
            logratio = (_written_out_logps(initial, *kl_rows) - _written_out_logps(trainer.reference, *kl_rows))
            assert logratio.mean().item() > 0.5
            assert spy.kl[0] == pytest.approx(logratio.mean().item(), rel=1e-5)
    (one, one_weights), (four, four_weights) = runs[8], runs[2]
    assert four.kl == approx_metrics(one.kl) and four.losses == approx_metrics(one.losses)
    for name, tensor in one_weights.items():
        torch.testing.assert_close(four_weights[name], tensor, rtol=1e-5, atol=1e-6)


def test_precomputed_reference_equals_the_live_one_and_lora_needs_no_copy(tmp_path, tiny_model_dir):
    live = _trainer(tmp_path / "live", tiny_model_dir, max_steps=3)
    precomputed = _trainer(tmp_path / "pre", tiny_model_dir, max_steps=3, kto={"precompute_ref_logps": True})
    assert precomputed.aux == {} and "reference" in live.aux
    spies = []
    for trainer in (live, precomputed):
        spies.append(KLSpy())
        trainer.callbacks.append(spies[-1])
        trainer.train()
    assert spies[1].losses == pytest.approx(spies[0].losses, rel=1e-5)
    assert spies[1].kl == pytest.approx(spies[0].kl, rel=1e-4, abs=1e-6)
    lora = _trainer(tmp_path / "lora", tiny_model_dir, max_steps=2, use_lora=True, lora_dropout=0.0)
    base = {n: p.detach().clone() for n, p in lora.model.named_parameters() if "lora_" not in n}
    assert lora.aux == {}
    lora.train()
    assert all(torch.equal(p, base[n]) for n, p in lora.model.named_parameters() if "lora_" not in n)
    assert any(p.abs().sum() > 0 for n, p in lora.model.named_parameters() if "lora_B" in n)


# ------------------------------------------------------------------------------------------------- TRL
def _trl_trainer(model, reference, tokenizer, tmp_path, **options):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from trl import KTOConfig
    from trl import KTOTrainer as TRLKTOTrainer

    assert trl.__version__ >= "1.16"
    data = Dataset.from_list([{"prompt": "a", "completion": "b", "label": True},
                              {"prompt": "c", "completion": "d", "label": False}])
    args = KTOConfig(output_dir=str(tmp_path / "trl"), report_to=[], per_device_train_batch_size=8, use_cpu=True,
                     bf16=False,  # else accelerate runs the reference under bf16 autocast; ours is float32 here
                     beta=options.get("beta", 0.1), desirable_weight=options.get("desirable_weight", 1.0),
                     undesirable_weight=options.get("undesirable_weight", 1.0))
    return TRLKTOTrainer(model=model, ref_model=reference, args=args, train_dataset=data, processing_class=tokenizer)


def _trl_batch(batch, rows=slice(None)):
    """Our collated batch in TRL's layout: the same ids; the completion mask marks our labelled tokens. `rows`
    picks the matched examples; the mismatched (KL) rows stay those of the whole batch."""
    return {"input_ids": batch["input_ids"][rows], "attention_mask": batch["attention_mask"][rows],
            "completion_mask": (batch["labels"][rows] != -100).long(), "label": batch["desirable"][rows],
            "KL_input_ids": batch["kl_input_ids"], "KL_attention_mask": batch["kl_attention_mask"],
            "KL_completion_mask": (batch["kl_labels"] != -100).long()}


def test_per_example_and_step_loss_and_a_20_step_curve_equal_trl(tmp_path, tiny_model_dir, sharper_reference):
    pytest.importorskip("trl")
    options = {"beta": 0.2, "desirable_weight": 1.3, "undesirable_weight": 0.8, "ref_model": str(sharper_reference)}
    trainer = _trainer(tmp_path, tiny_model_dir, shuffle=True, kto=options)
    trl_model = copy.deepcopy(trainer.model)
    trl_trainer = _trl_trainer(trl_model, copy.deepcopy(trainer.reference), trainer.tokenizer, tmp_path, **options)

    # One batch: each example's loss (TRL on that example alone, with the whole batch's KL rows) and the step loss.
    batch = trainer.collate(list(range(8)), trainer.train_dataset)
    trainer.prepare_step([batch], trainer.train_dataset)
    assert float(trainer._step_kl) > 0
    per_example, _ = trainer._example_terms(trainer.model, batch, trainer._step_kl)
    with torch.no_grad():
        trl_each = [trl_trainer._compute_loss(trl_model, _trl_batch(batch, slice(i, i + 1)), False).item()
                    for i in range(8)]
        trl_step = trl_trainer._compute_loss(trl_model, _trl_batch(batch), False).item()
    assert per_example.tolist() == pytest.approx(trl_each, abs=1e-5)
    assert trainer.compute_loss(trainer.model, batch, 8)[0].item() == pytest.approx(trl_step, abs=1e-5)

    seen = []
    original = trainer.compute_loss

    def recording(model, batch, num_items):
        seen.append({k: v.detach().clone() for k, v in batch.items()})
        return original(model, batch, num_items)

    trainer.compute_loss = recording
    recorder = Recorder()
    trainer.callbacks.append(recorder)
    trainer.train()
    losses = [m["train/loss"] for m in recorder.steps]

    # The same batches through TRL's loss, on a copy of the initial weights with the same AdamW and learning rate.
    optimizer = torch.optim.AdamW(trl_model.parameters(), lr=3e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    trl_losses = []
    for batch in seen:
        trl_model.train()
        loss = trl_trainer._compute_loss(trl_model, _trl_batch(batch), False)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        trl_losses.append(loss.item())
    assert len(trl_losses) == 20 and losses[0] == pytest.approx(trl_losses[0], abs=1e-5)
    assert max(abs(a - b) for a, b in zip(losses, trl_losses)) < 1e-4, (losses, trl_losses)
    kl = [m["train/kl"] for m in recorder.steps]
    assert trl_trainer._metrics["train"]["kl"][-20:] == pytest.approx(kl, abs=1e-5)


def test_kto_learns_from_labels_alone(tmp_path, tiny_model_dir):
    """Pairs split and shuffled so that no pair stays together: after training on the labels alone, each chosen
    reply gains log-probability against its rejected twin (held-out figures: docs/stages.md#kto)."""
    pairs = make_preference_records(24, seed=10)
    unpaired = write_jsonl(tmp_path / "unpaired.jsonl", make_unpaired_records(pairs, seed=3))
    trainer = _trainer(tmp_path, tiny_model_dir, train_file=str(unpaired),
                       eval_file=str(write_jsonl(tmp_path / "pairs.jsonl", pairs)), max_eval_samples=None,
                       batch_size=16, max_steps=12, shuffle=True)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert set(after) >= {"eval_loss", "eval_kl", "eval_rewards/chosen", "eval_rewards/rejected",
                          "eval_rewards/margins", "eval_logps/chosen", "eval_logps/rejected"}
    assert before["eval_rewards/margins"] == 0.0 and after["eval_rewards/margins"] > 0.5
    assert after["eval_loss"] < before["eval_loss"] - 0.05


def test_resume_mid_run_is_exact_and_eval_reports_kto_metrics(tmp_path, tiny_model_dir, capsys):
    settings = dict(max_steps=4, save_strategy="steps", save_steps=2, batch_size=4, shuffle=True, logging_steps=1)
    full = assert_resumed_mid_run_equals_uninterrupted(lambda folder, resume: _trainer(
        tmp_path / folder, tiny_model_dir, **({"resume_from_checkpoint": "latest"} if resume else {}), **settings),
        "train/kl")

    from rlhf_time.cli import main

    capsys.readouterr()
    example = Path(__file__).resolve().parents[2] / "examples" / "kto.yaml"
    assert main(["eval", str(example), f"model_name={full.run_dir / 'final'}", "max_eval_samples=8",
                 f"output_dir={tmp_path / 'eval'}"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert {"eval_loss", "eval_kl", "eval_rewards/margins", "eval_logps/chosen"} <= set(metrics)


def test_kto_streams_and_shifts_within_each_micro_batch(tmp_path, tiny_model_dir, sharper_reference):
    """streaming: true reads the pairs as a stream; each micro-batch's prompts meet its own completions shifted by
    one (the stream has no fixed order to pair by), and step 1's z_ref is their mean."""
    trainer = _trainer(tmp_path, tiny_model_dir, streaming=True, max_steps=2, batch_size=4, logging_steps=1,
                       eval_file=None, kto={"ref_model": str(sharper_reference)})
    steps, spy, initial = _train_watching_steps(trainer)
    batch = steps[0][0]
    mask, kl_mask = batch["attention_mask"].bool(), batch["kl_attention_mask"].bool()
    for row in range(4):  # the completion of row - 1 follows row's prompt
        previous = batch["input_ids"][row - 1][mask[row - 1]].tolist()
        completion = previous[next(i for i, t in enumerate(batch["labels"][row - 1].tolist()) if t != -100):]
        assert batch["kl_input_ids"][row][kl_mask[row]].tolist()[-len(completion):] == completion
    rows = (batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_labels"])
    expected = (_written_out_logps(initial, *rows) - _written_out_logps(trainer.reference, *rows)).mean().item()
    assert expected > 0 and spy.kl[0] == pytest.approx(expected, rel=1e-5)
