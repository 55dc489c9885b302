"""Training data: tokenizers, corpora, tokenized datasets on disk, and resumable sampling.

The pipeline is ``corpus`` (raw documents) -> ``tokenizer`` -> ``prepare`` (token files on
disk) -> ``dataset`` (memory-mapped samples) -> ``sampler`` (seeded, resumable batches).

The names below are imported on first use: the tokenizing worker processes of
``opt data prepare`` import ``opt.data.encode_pool`` alone, and must not pay for torch.
"""

import importlib

_EXPORTS = {
    "BatchLoader": "opt.data.loader",
    "SampleStream": "opt.data.sampler",
    "TokenDataset": "opt.data.dataset",
    "builtin_documents": "opt.data.corpus",
    "ensure_builtin_dataset": "opt.data.prepare",
    "eos_id": "opt.data.tokenizer",
    "iter_documents": "opt.data.corpus",
    "load_tokenizer": "opt.data.tokenizer",
    "prepare_dataset": "opt.data.prepare",
    "read_documents": "opt.data.corpus",
    "resolve_inputs": "opt.data.corpus",
    "save_tokenizer": "opt.data.prepare",
    "train_tokenizer": "opt.data.tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'opt.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
