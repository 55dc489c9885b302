from opt.checkpoint.checkpointer import (
    PendingCheckpoint,
    latest_checkpoint,
    list_checkpoints,
    load_model,
    load_model_args,
    load_model_weights,
    load_trainer_state,
    load_training_state,
    prune_checkpoints,
    save_checkpoint,
)
from opt.checkpoint.manifest import verify_checkpoint
from opt.checkpoint.staging import BackgroundStager

__all__ = [
    "BackgroundStager",
    "PendingCheckpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "load_model",
    "load_model_args",
    "load_model_weights",
    "load_trainer_state",
    "load_training_state",
    "prune_checkpoints",
    "save_checkpoint",
    "verify_checkpoint",
]
