"""ORPO and SimPO (`dpo.loss_type: orpo | simpo`): the losses against formulas written out in float64, no reference
model anywhere, and the per-pair loss, the step loss and a 20-step loss curve against TRL 1.16 (ORPOTrainer, and
CPOTrainer with loss_type="simpo") on identical token ids and weights."""

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rlhf_time import DPOTrainer, TrainerCallback, TrainingConfig
from rlhf_time.loss import create_loss

from .helpers import tiny_config
from .test_reward import preference_files


def written_out_avg_logps(model, batch):
    """Length-averaged log-probs of each row's labelled tokens (2B,), from full logits in float64."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    picked = F.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return (picked * mask).sum(-1) / mask.sum(-1)


def test_the_losses_equal_their_formulas():
    chosen = torch.tensor([-0.3, -1.7, -0.01, -4.0], dtype=torch.float64)
    rejected = torch.tensor([-0.9, -0.2, -2.5, -4.0], dtype=torch.float64)
    p_w, p_l = chosen.exp(), rejected.exp()
    odds = torch.log(p_w / (1 - p_w)) - torch.log(p_l / (1 - p_l))
    expected_orpo = -torch.log(torch.sigmoid(odds))
    got = create_loss("orpo", reduction="none")(chosen, rejected)
    torch.testing.assert_close(got.double(), expected_orpo, rtol=1e-6, atol=1e-6)
    beta, gamma = 2.0, 0.5
    expected_simpo = -torch.log(torch.sigmoid(beta * (chosen - rejected) - gamma))
    got = create_loss("simpo", beta=beta, gamma=gamma, reduction="none")(chosen, rejected)
    torch.testing.assert_close(got.double(), expected_simpo, rtol=1e-6, atol=1e-6)


def test_options_defaults_and_refusals():
    assert TrainingConfig(stage="dpo", dpo={"loss_type": "simpo"}).dpo.beta == 2.0  # SimPO's own default
    assert TrainingConfig(stage="dpo", dpo={"loss_type": "simpo", "beta": 1.5}).dpo.beta == 1.5
    assert TrainingConfig(stage="dpo").dpo.beta == 0.1
    with pytest.raises(Exception, match="loss_type orpo is reference-free: ref_model does not apply"):
        TrainingConfig(stage="dpo", dpo={"loss_type": "orpo", "ref_model": "somewhere"})


def _trainer(tmp_path, model_dir, loss_type, **dpo):
    config = tiny_config(tmp_path, model_dir, stage="dpo", batch_size=4, max_steps=20, learning_rate=3e-3,
                         lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=None, shuffle=False,
                         group_by_length=False, dpo={"loss_type": loss_type, **dpo}, **preference_files(tmp_path, 80, 8))
    return DPOTrainer(config)


@pytest.mark.parametrize("loss_type", ["orpo", "simpo"])
def test_no_reference_model_is_loaded_and_the_pair_terms_are_exact(tmp_path, tiny_model_dir, loss_type):
    trainer = _trainer(tmp_path, tiny_model_dir, loss_type)
    assert trainer.aux == {} and trainer.reference is None
    batch = trainer.collate([0, 1, 2, 3], trainer.train_dataset)
    per_pair, _, metrics = trainer._pair_terms(trainer.model, batch)
    averages = written_out_avg_logps(trainer.model, batch)
    torch.testing.assert_close(metrics["logps/chosen"].double(), averages[:4].sum(), rtol=1e-5, atol=1e-5)
    if loss_type == "orpo":
        p = averages.exp()
        expected = 0.1 * -F.logsigmoid(torch.log(p[:4] / (1 - p[:4])) - torch.log(p[4:] / (1 - p[4:])))
    else:
        expected = -F.logsigmoid(2.0 * (averages[:4] - averages[4:]) - 0.5)
    torch.testing.assert_close(per_pair.double(), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------- TRL
def _trl_trainer(loss_type, model, tokenizer, tmp_path, **options):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    data = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2)
    common = dict(output_dir=str(tmp_path / "trl"), report_to=[], per_device_train_batch_size=4, use_cpu=True)
    if loss_type == "orpo":
        args, cls = ORPOConfig(beta=options.get("orpo_lambda", 0.1), **common), ORPOTrainer
    else:
        args = CPOConfig(loss_type="simpo", beta=options.get("beta", 2.0), simpo_gamma=options.get("simpo_gamma", 0.5),
                         cpo_alpha=options.get("cpo_alpha", 0.0), **common)
        cls = CPOTrainer
    assert trl.__version__ >= "1.16"
    return cls(model=model, args=args, train_dataset=data, processing_class=tokenizer)


def _trl_batch(batch):
    """Our collated (2B, T) batch in TRL's paired layout: the same token ids, masks and labels, right-padded."""
    pairs = batch["margin"].numel()
    return {f"{side}_{key}": batch[name][rows] for side, rows in (("chosen", slice(None, pairs)),
                                                                     ("rejected", slice(pairs, None)))
            for key, name in (("input_ids", "input_ids"), ("attention_mask", "attention_mask"), ("labels", "labels"))}


def _response_nll(model, batch):
    """Token-mean cross-entropy of the chosen replies' labelled tokens (torch's own), over the batch."""
    pairs = batch["margin"].numel()
    logits = model(input_ids=batch["input_ids"][:pairs], attention_mask=batch["attention_mask"][:pairs]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:pairs, 1:].flatten(), ignore_index=-100)


def _prompt_and_response_nll(model, batch):
    """TRL ORPO's NLL: every attended token of the chosen rows (prompt included)."""
    pairs = batch["margin"].numel()
    ids, mask = batch["input_ids"][:pairs], batch["attention_mask"][:pairs]
    logits = model(input_ids=ids, attention_mask=mask).logits
    targets = ids.masked_fill(mask == 0, -100)[:, 1:]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


def _trl_step_loss(trl_trainer, loss_type, model, batch):
    """TRL's step loss on our batch; for ORPO with its NLL taken over the reply tokens, as the paper and we do
    (TRL's ORPO also trains the prompt tokens: docs/stages.md#orpo-and-simpo)."""
    loss, _ = trl_trainer.get_batch_loss_metrics(model, _trl_batch(batch))
    if loss_type == "orpo":
        loss = loss - _prompt_and_response_nll(model, batch) + _response_nll(model, batch)
    return loss


@pytest.mark.parametrize("loss_type,options", [("orpo", {}), ("simpo", {"cpo_alpha": 1.0})])  # simpo + its NLL term
def test_step_loss_and_a_20_step_curve_equal_trl(tmp_path, tiny_model_dir, loss_type, options):
    pytest.importorskip("trl")
    trainer = _trainer(tmp_path, tiny_model_dir, loss_type, **options)
    trl_model = copy.deepcopy(trainer.model)
    trl_trainer = _trl_trainer(loss_type, trl_model, trainer.tokenizer, tmp_path, **options)

    seen = []
    original = trainer.compute_loss

    def recording(model, batch, num_items):
        loss, metrics = original(model, batch, num_items)
        seen.append({k: v.detach().clone() for k, v in batch.items()})
        return loss, metrics

    trainer.compute_loss = recording
    losses = []

    class Losses(TrainerCallback):
        def on_step_end(self, t, metrics):
            losses.append(metrics["train/loss"])

    trainer.callbacks.append(Losses())
    trainer.train()

    # The same batches, through TRL's loss, on a copy of the initial weights with the same AdamW and learning rate.
    optimizer = torch.optim.AdamW(trl_model.parameters(), lr=3e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    trl_losses = []
    for step, batch in enumerate(seen):
        trl_model.train()
        loss = _trl_step_loss(trl_trainer, loss_type, trl_model, batch)
        if step == 0:  # the per-pair terms, and the step loss, on the first batch
            assert loss.item() == pytest.approx(losses[0], abs=1e-5)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        trl_losses.append(loss.item())
    assert len(trl_losses) == 20
    assert max(abs(a - b) for a, b in zip(losses, trl_losses)) < 1e-4, (losses, trl_losses)


def test_per_pair_orpo_term_equals_trl(tmp_path, tiny_model_dir):
    pytest.importorskip("trl")
    trainer = _trainer(tmp_path, tiny_model_dir, "orpo")
    trl_trainer = _trl_trainer("orpo", trainer.model, trainer.tokenizer, tmp_path)
    batch = trainer.collate([0, 1, 2, 3], trainer.train_dataset)
    per_pair, _, _ = trainer._pair_terms(trainer.model, batch)
    chosen, rejected = trl_trainer.concatenated_forward(trainer.model, _trl_batch(batch))[:2]
    trl_terms = trl_trainer.odds_ratio_loss(chosen, rejected)[0]  # lambda * log sigmoid(log odds), per pair
    torch.testing.assert_close(per_pair, -trl_terms, rtol=1e-5, atol=1e-6)
    assert math.isfinite(float(per_pair.sum()))


def test_orpo_with_a_reference_model_is_one_line_and_exit_2(tmp_path, capsys):
    from ..reliability.test_error_contract import one_error_line

    example = Path(__file__).resolve().parents[2] / "examples" / "orpo.yaml"
    line = one_error_line(capsys, ["train", str(example), "dpo.ref_model=outputs/sft/final",
                                   f"output_dir={tmp_path}"])
    assert "loss_type orpo is reference-free: ref_model does not apply" in line
