"""Training and inference pipeline: the paper's 2D->3D schedule, checkpoints, evaluation, parity."""
from ahnet_fast.training.config import TrainConfig
from ahnet_fast.training.loop import train, train_schedule

__all__ = ["TrainConfig", "train", "train_schedule"]
