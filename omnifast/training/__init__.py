"""Training: the five OpenOmni stages as data, the data format and its loader, one trainer,
evaluation."""

from .checkpoint import CheckpointError, latest_checkpoint
from .config import TrainConfig
from .data import DataError, Record, RecordFile, load_records
from .loader import ConversationDataset, MicroBatches
from .metrics import read_metrics
from .stages import STAGES, Stage, get_stage
from .trainer import Trainer

__all__ = [
    "STAGES",
    "Stage",
    "get_stage",
    "Record",
    "RecordFile",
    "DataError",
    "load_records",
    "ConversationDataset",
    "MicroBatches",
    "Trainer",
    "TrainConfig",
    "latest_checkpoint",
    "read_metrics",
    "CheckpointError",
]
