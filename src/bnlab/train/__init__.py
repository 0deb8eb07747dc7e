"""Training: settings, the loop, callbacks, checkpoints, evaluation and prediction.

>>> from bnlab import train
>>> result = train.train(train.TrainSettings(dataset="fashion-mnist", model="deeplizard-cnn", bn="tutorial", epochs=2))
>>> result.history.final()["test_acc"]
"""

from bnlab.train.activations import ActivationTracker
from bnlab.train.augment import Augment
from bnlab.train.callbacks import Callback, EarlyStopping, EpochPrinter
from bnlab.train.checkpoint import Checkpoint, fold_checkpoint, load_checkpoint, save_checkpoint
from bnlab.train.evaluate import evaluate, format_evaluation, predict_images
from bnlab.train.loop import History, TrainState, evaluate_loss_acc, fit, make_optimizer
from bnlab.train.run import RunResult, build_model, load_data, train
from bnlab.train.settings import OPTIMIZERS, TrainSettings

__all__ = ["ActivationTracker", "Augment", "Callback", "EarlyStopping", "EpochPrinter", "Checkpoint", "fold_checkpoint", "load_checkpoint", "save_checkpoint", "evaluate",
           "format_evaluation", "predict_images", "History", "TrainState", "evaluate_loss_acc", "fit", "make_optimizer",
           "RunResult", "build_model", "load_data", "train", "OPTIMIZERS", "TrainSettings"]
