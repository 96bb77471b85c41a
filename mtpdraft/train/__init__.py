"""Drafter training: data written by the target, cached features, unrolled training, eval.

Entry point: `mtpdraft train` (see mtpdraft/train/train.py for the exact commands).
"""

from .train import TrainConfig, run, ship

__all__ = ["TrainConfig", "run", "ship"]
