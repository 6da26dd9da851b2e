"""The paper's 4,712-parameter MNIST network (docs/algorithms.md §7)."""

from torch import nn

DROPOUT = 0.1  # the paper adds dropout before the last layer without giving its rate


def paper_cnn(dropout: float = DROPOUT) -> nn.Sequential:
    """conv 1→5 (5×5) + ReLU + maxpool 2; conv 5→7 (5×5) + ReLU + maxpool 2; 112→30 + ReLU; dropout; 30→10.

    Input (N, 1, 28, 28) float; output (N, 10) logits.
    """
    return nn.Sequential(
        nn.Conv2d(1, 5, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(5, 7, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(112, 30), nn.ReLU(), nn.Dropout(dropout), nn.Linear(30, 10),
    )  # fmt: skip
