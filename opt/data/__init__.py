"""Training data: tokenizers, corpora, tokenized datasets on disk, and resumable sampling.

The pipeline is ``corpus`` (raw documents) -> ``tokenizer`` -> ``prepare`` (token files on
disk) -> ``dataset`` (memory-mapped samples) -> ``sampler`` (seeded, resumable batches).
"""

from opt.data.corpus import builtin_documents, iter_documents, read_documents, resolve_inputs
from opt.data.dataset import TokenDataset
from opt.data.prepare import ensure_builtin_dataset, prepare_dataset, save_tokenizer
from opt.data.sampler import BatchLoader, SampleStream
from opt.data.tokenizer import eos_id, load_tokenizer, train_tokenizer

__all__ = [
    "BatchLoader",
    "SampleStream",
    "TokenDataset",
    "builtin_documents",
    "ensure_builtin_dataset",
    "eos_id",
    "iter_documents",
    "load_tokenizer",
    "prepare_dataset",
    "read_documents",
    "resolve_inputs",
    "save_tokenizer",
    "train_tokenizer",
]
