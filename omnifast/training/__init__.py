"""Training: the five OpenOmni stages as data, the data format, one trainer, evaluation."""
from .checkpoint import CheckpointError
from .data import ConversationDataset, DataError, Record, load_records
from .stages import STAGES, Stage, get_stage
from .trainer import Trainer, TrainConfig, latest_checkpoint, read_metrics

__all__ = ["STAGES", "Stage", "get_stage", "Record", "DataError", "load_records", "ConversationDataset",
           "Trainer", "TrainConfig", "latest_checkpoint", "read_metrics", "CheckpointError"]
