"""PPO's critic on its own: values from a reward-model folder match that model's own score, a new head on the policy,
and the critic's optimiser lowers the value loss on a fixed batch."""

from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification

from rlhf_time import TrainingConfig
from rlhf_time.loss import create_loss
from rlhf_time.models import load_tokenizer, model_family
from rlhf_time.experience.critic import CriticOptimizer, build_critic, value_model_source
from rlhf_time.runtime.guards import NonFiniteGuard
from rlhf_time.runtime.update import ModelUpdate
from rlhf_time.runtime.distributed import DistributedContext

CPU = DistributedContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))  # one process


def _config(tmp_path, model_dir, **overrides):
    return TrainingConfig(stage="ppo", model_name=str(model_dir), output_dir=str(tmp_path), report_to="none",
                          **overrides)


def _rm_folder(tmp_path, model_dir):
    torch.manual_seed(3)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    with torch.no_grad():
        model.score.weight.normal_()
    folder = tmp_path / "rm"
    model.save_pretrained(folder)
    load_tokenizer(_config(tmp_path, model_dir)).save_pretrained(folder)
    return folder


def test_value_model_source_defaults():
    assert value_model_source(TrainingConfig(stage="ppo")) == "policy"
    assert value_model_source(TrainingConfig(stage="ppo", rollout={"reward_model": "rm"})) == "rm"
    assert value_model_source(TrainingConfig(stage="ppo", ppo={"value_model": "policy"},
                                             rollout={"reward_model": "rm"})) == "policy"


def test_critic_from_a_reward_model_reads_its_score_at_every_token(tmp_path, tiny_model_dir):
    folder = _rm_folder(tmp_path, tiny_model_dir)
    config = _config(tmp_path, tiny_model_dir, ppo={"value_model": str(folder)})
    tokenizer = load_tokenizer(config)
    critic = build_critic(config, tokenizer, model_family(config), CPU).eval()
    reference = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    reference.config.pad_token_id = tokenizer.pad_token_id
    ids = torch.tensor([tokenizer("把数字写成中文：12 十二").input_ids])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        values = critic(ids, mask)  # (1, T)
        for end in (3, ids.shape[1]):  # the RM's pooled score of each prefix = the critic's value at its last token
            score = reference(input_ids=ids[:, :end], attention_mask=mask[:, :end]).logits[0, 0]
            torch.testing.assert_close(values[0, end - 1], score, rtol=1e-4, atol=1e-5)


def test_policy_critic_is_the_policy_backbone_with_a_seeded_new_head(tmp_path, tiny_model_dir):
    config = _config(tmp_path, tiny_model_dir)
    tokenizer = load_tokenizer(config)
    first = build_critic(config, tokenizer, model_family(config), CPU)
    second = build_critic(config, tokenizer, model_family(config), CPU)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name  # the same new head every time (ranks, resumed runs)
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    embed = policy.get_input_embeddings().weight
    torch.testing.assert_close(first.model.get_input_embeddings().weight, embed)


def test_critic_optimizer_lowers_the_value_loss_on_a_fixed_batch(tmp_path, tiny_model_dir):
    config = _config(tmp_path, tiny_model_dir, ppo={"critic_learning_rate": 3e-3}, warmup_steps_ratio=0.0)
    critic = build_critic(config, load_tokenizer(config), model_family(config), CPU)
    optimizer = CriticOptimizer(critic, config, total_steps=10)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 200, (4, 12), generator=generator)
    mask = torch.ones_like(ids)
    loss_mask = torch.tensor([[t < n for t in range(12)] for n in (12, 7, 3, 9)])
    returns = torch.randn(4, 12, generator=generator)
    value_loss = create_loss("value", clip_eps=10.0)
    # The critic steps through the loop's own machinery (as PPO's critic_step does).
    update = ModelUpdate(critic, critic, optimizer.optimizer, optimizer.scheduler,
                         NonFiniteGuard("stop", 3, subject="critic"), max_grad_norm=config.max_grad_norm,
                         world_size=1, device=torch.device("cpu"))

    def loss_fn(model, batch, num_items):
        values = model(batch["ids"], batch["mask"])
        return value_loss(values, values.detach(), batch["returns"], batch["loss_mask"]), {}

    batch = {"ids": ids, "mask": mask, "loss_mask": loss_mask, "returns": returns}
    losses = [update.step([batch], loss_fn, lambda b: 1, global_step=i + 1, run_dir=tmp_path).loss for i in range(8)]
    assert losses[-1] < 0.5 * losses[0], losses
    state = optimizer.state_dict()
    restored = CriticOptimizer(critic, config, total_steps=10)
    restored.load_state_dict(state)
    assert restored.scheduler.last_epoch == optimizer.scheduler.last_epoch == 8
