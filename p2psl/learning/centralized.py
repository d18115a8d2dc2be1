"""The baseline: the same model trained in one place on all the training data (SPEC §1, check b).

Same spec, same per-layer initialisation, same SGD settings, same batch size and the same kind of
deterministic batch order as the split run, so a gap between the two is the cost of splitting and
federating, not of a different recipe. It runs through `OwnerModel` with no compute hop, which is
split learning with nothing in the middle — the loss code is literally the one owners use.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from p2psl.learning.data import Dataset, batch_order, load_dataset
from p2psl.learning.models import OptimConfig, OwnerModel, model_spec

if TYPE_CHECKING:
    from p2psl.topology import TrainingConfig


def train_centralized(cfg: TrainingConfig, epochs: int | None = None) -> dict:
    """Train on the whole training set, evaluate on the whole test set.

    `epochs` defaults to rounds × local_epochs, the passes each owner makes over its shard.
    Returns test_accuracy, train_loss (mean over the last epoch's samples), epochs and seconds.
    """
    started = time.perf_counter()
    data = load_dataset(cfg)
    spec = model_spec(cfg.model, data.input_shape, data.num_classes)
    layers = spec.num_layers
    model = OwnerModel(spec, range(layers - 1), [layers - 1], cfg.seed, OptimConfig.from_training(cfg), "centralized")
    epochs = cfg.rounds * cfg.local_epochs if epochs is None else epochs
    loss = float("nan")
    for epoch in range(epochs):
        round_, local = divmod(epoch, cfg.local_epochs)
        loss = _train_epoch(model, data, cfg.batch_size, cfg.seed, round_, local)
    return {
        "test_accuracy": evaluate(model, data, cfg.eval_batch_size),
        "train_loss": loss,
        "epochs": epochs,
        "seconds": time.perf_counter() - started,
    }


def _train_epoch(model: OwnerModel, data: Dataset, batch_size: int, seed: int, round_: int, epoch: int) -> float:
    total, count = 0.0, 0
    for batch_id, batch in enumerate(batch_order(len(data.y_train), batch_size, seed, round_, epoch, 0)):
        index = torch.from_numpy(batch)
        key = (round_, epoch, batch_id)
        h = model.forward(key, data.x_train[index])
        loss, grad = model.loss_backward(key, h, data.y_train[index])
        model.backward(key, grad)
        model.step()
        total, count = total + loss * len(batch), count + len(batch)
    return total / count


def evaluate(model: OwnerModel, data: Dataset, batch_size: int) -> float:
    """Accuracy on the whole test set."""
    correct = 0
    for start in range(0, len(data.y_test), batch_size):
        x = data.x_test[start:start + batch_size]
        logits = model.predict(model.embed(x))
        correct += int((logits.argmax(dim=1) == data.y_test[start:start + batch_size]).sum())
    return correct / len(data.y_test)
