"""Knowledge distillation on tiny models: the KD term against an independent full-logits computation, zero loss
and zero gradients when student = teacher, a trained teacher taught to a fresh student with no ground-truth loss,
on-policy steps on the student's own samples, the vocabulary check, and the CLI."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from rlhf_time import KDTrainer, RlhfTimeError, TrainerCallback
from rlhf_time.cli import main
from rlhf_time.data.quickstart import EVAL_FILE, TRAIN_FILE
from rlhf_time.quickstart import exact_match

from .helpers import merged, build_teacher, tiny_config, weights

KINDS = ("forward", "reverse", "jsd")
# The quickstart's recipe (batch 16, cosine from 2e-3) for 2.4 epochs of its 2,000 records instead of its 4: greedy
# exact match on the 32 held-out prompts after 300 steps measured 0.84 / 0.94 / 0.97 for seeds 42 / 7 / 8 (at 250
# steps 0.59 for seed 7, too close to the 0.5 asserted below).
STUDENT_STEPS = 300


def kd_config(tmp_path, student_dir, teacher_dir, **overrides):
    values = dict(stage="kd", kd={"teacher_model": str(teacher_dir), "alpha": 0.0}, max_steps=2)
    return tiny_config(tmp_path, student_dir, **merged(values, overrides))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_model_dir):
    return build_teacher(tmp_path_factory.mktemp("teacher"), tiny_model_dir)


def independent_kd(student_logits, teacher_logits, kind, temperature, beta):
    """Per position, from full logits: F.kl_div for the KLs, the generalised JSD written out from probabilities."""
    log_s = F.log_softmax(student_logits.double() / temperature, -1)
    log_t = F.log_softmax(teacher_logits.double() / temperature, -1)
    if kind == "forward":  # KL(teacher || student); kl_div(input=log q, target=log p) = sum p (log p - log q)
        kl = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)
    elif kind == "reverse":
        kl = F.kl_div(log_t, log_s, log_target=True, reduction="none").sum(-1)
    else:
        p_s, p_t = log_s.exp(), log_t.exp()
        m = beta * p_t + (1 - beta) * p_s
        kl = beta * (p_t * (p_t / m).log()).sum(-1) + (1 - beta) * (p_s * (p_s / m).log()).sum(-1)
    return kl * temperature**2


@pytest.mark.parametrize("kind", KINDS)
def test_kd_term_equals_an_independent_full_logits_computation(tmp_path, tiny_model_dir, teacher_dir, kind):
    trainer = KDTrainer(kd_config(tmp_path, tiny_model_dir, teacher_dir,
                                  kd={"loss_type": kind, "temperature": 2.0, "beta": 0.3},
                                  loss_chunk_size=7))
    batch = trainer.collate([0, 1, 2, 3], trainer.train_dataset)
    loss, sums = trainer.kd_terms(trainer.model, batch, num_items=None, label_smoothing=0.0)
    student = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        s_logits, t_logits = student(**inputs).logits[:, :-1], teacher(**inputs).logits[:, :-1]
    targets = batch["labels"][:, 1:] != -100
    per_token = independent_kd(s_logits, t_logits, kind, 2.0, 0.3)[targets]
    assert sums["tokens"].item() == targets.sum().item() > 20
    assert sums["kd"].item() == pytest.approx(per_token.sum().item(), rel=1e-5)
    assert loss.item() == pytest.approx(per_token.mean().item(), rel=1e-5)  # kd_alpha = 0: the KD term alone
    ce = F.cross_entropy(s_logits[targets].double(), batch["labels"][:, 1:][targets], reduction="sum")
    assert sums["ce"].item() == pytest.approx(ce.item(), rel=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_student_equal_to_teacher_gives_zero_loss_and_zero_gradients(tmp_path, tiny_model_dir, kind):
    trainer = KDTrainer(kd_config(tmp_path, tiny_model_dir, tiny_model_dir, kd={"loss_type": kind, "temperature": 1.5}))
    batch = trainer.collate([0, 1, 2], trainer.train_dataset)
    loss, sums = trainer.kd_terms(trainer.model, batch, num_items=None, label_smoothing=0.0)
    loss.backward()
    assert sums["kd"].item() == pytest.approx(0.0, abs=1e-6)
    grads = [p.grad for p in trainer.model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().max().item() < 1e-6 for g in grads)
    assert not any(p.requires_grad for p in trainer.aux["teacher"].parameters())


def test_alpha_mixes_ce_and_kd_and_both_are_logged(tmp_path, tiny_model_dir, teacher_dir):
    steps = []

    class Recorder(TrainerCallback):
        def on_step_end(self, trainer, metrics):
            steps.append(metrics)

    trainer = KDTrainer(kd_config(tmp_path, tiny_model_dir, teacher_dir, kd={"alpha": 0.25}, max_steps=1, batch_size=4))
    trainer.callbacks.append(Recorder())
    before = weights(trainer.model)
    trainer.train()
    first = steps[0]
    assert first["train/loss"] == pytest.approx(0.25 * first["train/ce_loss"] + 0.75 * first["train/kd_loss"], rel=1e-5)
    assert first["train/kd_loss"] > 0 and first["train/ce_loss"] > 0
    assert all(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_kd_loss", "eval_token_accuracy"} <= set(metrics)


def test_a_trained_teacher_teaches_a_fresh_student_without_any_ground_truth_loss(tmp_path, tiny_model_dir,
                                                                                  quickstart_run):
    """kd_alpha = 0: the student never sees the data's answers as targets, only the teacher's distributions.
    The teacher is the quickstart's trained model; the student starts from the untrained tiny model."""
    records = [json.loads(line) for line in EVAL_FILE.read_text(encoding="utf-8").splitlines()][:32]
    student = KDTrainer(kd_config(tmp_path, tiny_model_dir, quickstart_run["final_model_dir"], train_file=str(TRAIN_FILE),
                                  max_train_samples=None, batch_size=16, learning_rate=2e-3, lr_scheduler_type="cosine",
                                  warmup_steps_ratio=0.05, weight_decay=0.0, max_steps=STUDENT_STEPS, max_new_tokens=10))
    untrained = exact_match(student, records)
    student.train()
    distilled = exact_match(student, records)
    print(f"greedy exact match on 32 held-out prompts: teacher {quickstart_run['exact_match_after']:.2f}, "
          f"student {untrained:.2f} -> {distilled:.2f} after {STUDENT_STEPS} steps")
    assert quickstart_run["exact_match_after"] >= 0.5 and untrained == 0.0
    assert distilled >= 0.5


def test_on_policy_steps_train_on_the_students_own_samples(tmp_path, tiny_model_dir, teacher_dir):
    trainer = KDTrainer(kd_config(tmp_path, tiny_model_dir, teacher_dir, kd={"on_policy_ratio": 1.0}, max_new_tokens=6,
                                  logging_steps=1, temperature=1.0))
    batch = trainer.collate([0, 1, 2], trainer.train_dataset)
    torch.manual_seed(0)
    rolled = trainer.student_rollout(batch)
    stop = set(trainer.inference.stop_token_ids())
    for row in range(3):
        original_labels = batch["labels"][row].tolist()
        prompt_length = next(i for i, label in enumerate(original_labels) if label != -100)
        ids, labels, mask = rolled["input_ids"][row], rolled["labels"][row], rolled["attention_mask"][row]
        assert torch.equal(ids[:prompt_length], batch["input_ids"][row, :prompt_length])  # the same prompt
        assert (labels[:prompt_length] == -100).all()
        completion = ids[prompt_length : int(mask.sum())].tolist()
        assert 1 <= len(completion) <= 6 and labels[prompt_length : int(mask.sum())].tolist() == completion
        assert completion[-1] in stop or len(completion) == 6
        assert all(token not in stop for token in completion[:-1])
    results = trainer.train()
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["train/on_policy"] for row in rows if "train/on_policy" in row] == [1.0, 1.0]
    assert results["global_step"] == 2


def test_a_teacher_with_another_vocabulary_is_refused_before_loading(tmp_path, tiny_model_dir, llama_model_dir):
    with pytest.raises(RlhfTimeError, match="do not share a vocabulary") as error:
        KDTrainer(kd_config(tmp_path, tiny_model_dir, llama_model_dir))
    assert str(llama_model_dir) in str(error.value) and str(tiny_model_dir) in str(error.value)


def test_cli_trains_stage_kd(tmp_path, tiny_model_dir, teacher_dir, capsys):
    config = kd_config(tmp_path, tiny_model_dir, teacher_dir)
    path = tmp_path / "kd.yaml"
    config.to_yaml(path)
    assert main(["train", str(path), "max_steps=1"]) == 0
    assert '"global_step": 1' in capsys.readouterr().out
    assert (config.run_dir / "final" / "model.safetensors").is_file()
