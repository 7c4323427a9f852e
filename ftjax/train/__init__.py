"""The training engine: one pure step, parallel compilation, checkpoints, the loop."""

from ftjax.train.checkpoint import Checkpointer, CheckpointMismatch, DamagedCheckpoint
from ftjax.train.config import default_config, validate_run_config
from ftjax.train.loop import RunResult, TrainingDiverged, evaluate, load_base, train
from ftjax.train.optim import ConfigError, build_optimizer, default_optim_config
from ftjax.train.parallel import MODES, Parallel
from ftjax.train.step import StepConfig, TrainState, eval_step, token_losses, train_step

__all__ = [
    "MODES",
    "CheckpointMismatch",
    "Checkpointer",
    "ConfigError",
    "DamagedCheckpoint",
    "Parallel",
    "RunResult",
    "StepConfig",
    "TrainingDiverged",
    "TrainState",
    "build_optimizer",
    "default_config",
    "default_optim_config",
    "eval_step",
    "evaluate",
    "load_base",
    "token_losses",
    "train",
    "train_step",
    "validate_run_config",
]
