"""Training: the loop (training.loop) and its parts (configuration, data, optimiser,
precision, MFU, distributed, evaluation, log).

``from gptfast.training import TrainConfig, train, evaluate`` is the public entry.
"""
from gptfast.training.config import TrainConfig
from gptfast.training.evaluation import evaluate
from gptfast.training.loop import train

__all__ = ["TrainConfig", "train", "evaluate"]
