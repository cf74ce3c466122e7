"""A small NumPy/CuPy multilayer-perceptron trainer whose batch-norm layers are fastbn's.

Layers (:class:`Linear`, :class:`BatchNorm`, :class:`ReLU`, :class:`Tanh`,
:class:`Sigmoid`, :class:`Dropout`) carry hand-written backward passes; :class:`BatchNorm`
calls fastbn's public API. One code path serves NumPy and CuPy: the array namespace is
picked once by :func:`array_module` and handed to every layer.

Examples
--------
>>> from fastbn.nn import load_dataset, train_mlp            # doctest: +SKIP
>>> model, trainer, hist = train_mlp(load_dataset("mnist1d"), batch_norm=True, steps=500)
>>> hist.test_acc[-1]                                         # doctest: +SKIP
"""

from ._device import DEVICES, array_module, to_host
from .data import DATASETS, Dataset, batch_indices, load_dataset
from .layers import (
                     ACTIVATIONS,
                     INITS,
                     MLP,
                     BatchNorm,
                     Dropout,
                     Linear,
                     Module,
                     Parameter,
                     ReLU,
                     Sequential,
                     Sigmoid,
                     Tanh,
)
from .losses import SoftmaxCrossEntropy
from .optim import SGD, Adam, make_optimizer
from .train import History, Trainer, evaluate, progress_bar, train_mlp

__all__ = [
    "DEVICES", "array_module", "to_host", "DATASETS", "Dataset", "batch_indices", "load_dataset",
    "ACTIVATIONS", "INITS", "MLP", "BatchNorm", "Dropout", "Linear", "Module", "Parameter", "ReLU",
    "Sequential", "Sigmoid", "Tanh", "SoftmaxCrossEntropy", "SGD", "Adam", "make_optimizer",
    "History", "Trainer", "evaluate", "progress_bar", "train_mlp",
]
