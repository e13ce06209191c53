"""Training: the loop (``training.loop``) and its parts: settings (``config``), data and the
embedded corpus (``data``), AdamW and the schedule (``optim``), autocast (``precision``),
MFU (``mfu``), DDP / FSDP2 (``distributed``), validation loss and samples (``evaluation``),
console and metrics log (``log``).

``from gptfast.training import TrainConfig, train, evaluate`` is the public entry; the
other names here are the ones ``gptfast.training`` has always offered.
"""
from gptfast.training.config import TRAIN_PRESETS, TrainConfig, load_config_file
from gptfast.training.evaluation import EvalResult, evaluate, sample_text
from gptfast.training.loop import StepInfo, TrainResult, train
from gptfast.training.optim import build_optimizer, lr_at

__all__ = ["TrainConfig", "TRAIN_PRESETS", "TrainResult", "StepInfo", "EvalResult", "train", "evaluate", "lr_at",
           "build_optimizer", "sample_text", "load_config_file"]
