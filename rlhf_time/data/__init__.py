"""Data: sources (jsonl/json/csv/parquet, datasets folders, Hub) and readers, record formats, tokenisation with loss masks, caching, collators, batching."""

from rlhf_time.data.collate import PaddingCollator, PreferenceCollator
from rlhf_time.data.dataset import (DATA_KINDS, DataStats, PreferenceDataset, TokenizedDataset,
                                    load_dataset_of_kind, load_preference_dataset, load_sft_dataset, read_prompts)
from rlhf_time.data.formats import PreferencePair, detect_format, to_messages, to_preference
from rlhf_time.data.packing import PackingCollator, block_causal_mask, first_fit_decreasing
from rlhf_time.data.readers import Record, read_records
from rlhf_time.data.sources import DataSpec, eval_spec, read_source, train_spec
from rlhf_time.data.sampler import plan_batches, shard_batches
from rlhf_time.data.tokenize import ConversationEncoder, tokenize_preference_pair, tokenize_preference_pairs
from rlhf_time.data.validation import validate_data_file

__all__ = [
    "PaddingCollator", "PackingCollator", "block_causal_mask", "first_fit_decreasing", "PreferenceCollator",
    "DATA_KINDS", "DataStats", "PreferenceDataset", "TokenizedDataset", "load_dataset_of_kind",
    "load_preference_dataset", "load_sft_dataset", "read_prompts", "validate_data_file", "PreferencePair",
    "detect_format", "to_messages", "to_preference", "Record", "read_records", "plan_batches", "shard_batches",
    "ConversationEncoder", "tokenize_preference_pair", "tokenize_preference_pairs",
    "DataSpec", "eval_spec", "read_source", "train_spec",
]
