"""The training engine: one pure step, parallel compilation, checkpoints, the loop."""

from ftjax.train.checkpoint import Checkpointer, CheckpointMismatch, DamagedCheckpoint
from ftjax.train.config import default_config, validate_run_config
from ftjax.train.loop import RunResult, TrainingDiverged, evaluate, train
from ftjax.train.optim import ConfigError, build_optimizer, default_optim_config
from ftjax.train.parallel import MODES, Parallel
from ftjax.train.state import RunStart, build_run, init_state, load_base, seed_keys, state_info
from ftjax.train.step import StepConfig, TrainState, eval_step, token_losses, train_step

__all__ = [
    "MODES",
    "CheckpointMismatch",
    "Checkpointer",
    "ConfigError",
    "DamagedCheckpoint",
    "Parallel",
    "RunResult",
    "RunStart",
    "StepConfig",
    "TrainingDiverged",
    "TrainState",
    "build_optimizer",
    "build_run",
    "default_config",
    "default_optim_config",
    "eval_step",
    "evaluate",
    "init_state",
    "load_base",
    "seed_keys",
    "state_info",
    "token_losses",
    "train",
    "train_step",
    "validate_run_config",
]
