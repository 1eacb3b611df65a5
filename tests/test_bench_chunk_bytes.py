"""Loss chunks sized by bytes: the largest logits block is the byte budget whatever the vocabulary, an explicit
chunk size still wins, the numbers do not depend on the chunking, and the trainer passes both settings through."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from rlhf_time import SFTrainer, TrainingConfig
from rlhf_time.loss import DEFAULT_CHUNK_BYTES, chunk_rows, chunked_sequence_logps, chunked_sft_loss
from tests.trainer.helpers import tiny_config, train_losses


class _LargestFloat32(TorchDispatchMode):
    """The largest float32 tensor (elements) any op produces."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
                self.largest = max(self.largest, value.numel())
        return out


def test_chunk_rows_from_bytes_or_explicit_size():
    assert DEFAULT_CHUNK_BYTES == 128 * 2**20
    assert chunk_rows(151_936) == 128 * 2**20 // (4 * 151_936) == 220  # Qwen3: 220 rows of float32 logits
    assert chunk_rows(1_024) == 32_768
    assert chunk_rows(151_936, chunk_size=1024) == 1024  # a user's loss_chunk_size wins
    assert chunk_rows(10**9) == 1  # never zero rows


@pytest.mark.parametrize("vocab", [500, 2_000, 6_000])
def test_largest_logits_block_stays_within_the_byte_budget_for_every_vocabulary(vocab):
    budget = 64 * 1024  # bytes: 16,384 float32 values
    tokens, width = 300, 2
    hidden = torch.randn(1, tokens + 1, width, requires_grad=True)
    weight = torch.randn(vocab, width, requires_grad=True)
    labels = torch.randint(0, vocab, (1, tokens + 1))
    rows = budget // (4 * vocab)
    with _LargestFloat32() as forward:
        loss = chunked_sft_loss(hidden, weight, labels, chunk_bytes=budget)
    with _LargestFloat32() as logps_pass:
        chunked_sequence_logps(hidden, weight, labels, chunk_bytes=budget).sum().backward()
    head_gradient = vocab * width  # (V, H): every method holds it; here it is smaller than the budget
    assert head_gradient < budget // 4 < tokens * vocab
    assert forward.largest == logps_pass.largest == rows * vocab <= budget // 4  # one block, never all logits
    # and the value is the full-logits cross-entropy
    expected = F.cross_entropy((hidden[0, :-1] @ weight.T), labels[0, 1:])
    torch.testing.assert_close(loss, expected)


def test_the_trainer_gives_the_same_losses_with_byte_sized_and_explicit_chunks(tmp_path, tiny_model_dir):
    settings = dict(max_steps=2, max_train_samples=16, logging_steps=1)
    by_bytes = SFTrainer(tiny_config(tmp_path / "bytes", tiny_model_dir, loss_chunk_bytes=4096, **settings))
    by_bytes.train()
    explicit = SFTrainer(tiny_config(tmp_path / "rows", tiny_model_dir, loss_chunk_size=3, **settings))
    explicit.train()
    a, b = train_losses(by_bytes.run_dir / "metrics.jsonl"), train_losses(explicit.run_dir / "metrics.jsonl")
    assert sorted(a) == [1, 2]
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5)


def test_config_defaults_and_validation():
    config = TrainingConfig()
    assert config.loss_chunk_size is None and config.loss_chunk_bytes == 128 * 2**20 and config.torch_compile is False
    with pytest.raises(Exception, match="loss_chunk_bytes"):
        TrainingConfig(loss_chunk_bytes=0)
