"""Training: state, optimizer, loss, jitted step, loop, metrics."""
from repo_jax.train.loop import TrainingError, run
from repo_jax.train.state import ModelSpec, TrainState, init_params, model_spec

__all__ = ["run", "TrainingError", "TrainState", "ModelSpec", "model_spec", "init_params"]
