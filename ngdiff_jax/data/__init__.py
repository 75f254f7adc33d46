"""Benchmark data: TOFU and MUSE loaders, prompt formatting, bucketed batching,
an offline synthetic TOFU-style benchmark and local tokenizer training."""

from ngdiff_jax.data.batching import (
    Batcher,
    BatchPosition,
    bucket_lengths,
    collate,
    make_batches,
    pad_prompts,
)
from ngdiff_jax.data.formatting import (
    DEFAULT_TEMPLATE,
    FORMAT_FILE,
    IGNORE_INDEX,
    FormatSpec,
    QAFormatter,
    available_formats,
    load_format,
    read_format,
    save_format,
)
from ngdiff_jax.data.jsonio import read_records, write_jsonl
from ngdiff_jax.data.muse import MUSE_HUB_IDS, MUSE_SUBSETS, chunk_corpus, load_muse
from ngdiff_jax.data.tofu import HOLDOUT_FOR_FORGET, RETAIN_FOR_FORGET, TOFU_HUB_ID, TOFU_SPLITS, load_tofu
from ngdiff_jax.data.tokenizer import train_tokenizer

__all__ = [
    "DEFAULT_TEMPLATE",
    "FORMAT_FILE",
    "HOLDOUT_FOR_FORGET",
    "IGNORE_INDEX",
    "MUSE_HUB_IDS",
    "MUSE_SUBSETS",
    "RETAIN_FOR_FORGET",
    "TOFU_HUB_ID",
    "TOFU_SPLITS",
    "BatchPosition",
    "Batcher",
    "FormatSpec",
    "QAFormatter",
    "available_formats",
    "load_format",
    "read_format",
    "save_format",
    "bucket_lengths",
    "chunk_corpus",
    "collate",
    "load_muse",
    "load_tofu",
    "make_batches",
    "pad_prompts",
    "read_records",
    "train_tokenizer",
    "write_jsonl",
]
