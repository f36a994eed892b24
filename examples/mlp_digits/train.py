"""Train an MLP on scikit-learn's bundled digits (8x8 images, 10 classes) with a compiled training step.

    python examples/mlp_digits/train.py          # compile, train, print test accuracy per epoch
    pockengine build examples/mlp_digits/train.py -o build/mlp_digits   # just the artifact
"""

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import pockengine as pe

BATCH = 32
EPOCHS = 8

torch.manual_seed(0)
images, labels = load_digits(return_X_y=True)
x_train, x_test, y_train, y_test = train_test_split(
    (images / 16.0).astype("float32"), labels.astype("int64"), test_size=0.25, random_state=0, stratify=labels
)

model = nn.Sequential(
    nn.Linear(64, 128), nn.ReLU(),
    nn.Linear(128, 64), nn.ReLU(),
    nn.Linear(64, 10),
)

job = pe.TrainingJob(
    model=model,
    example_inputs=(torch.from_numpy(x_train[:BATCH]),),
    example_targets=torch.from_numpy(y_train[:BATCH]),
    loss="cross_entropy",
    optimizer=pe.optim.SGD(lr=0.05, momentum=0.9),
    name="mlp_digits",
)


def test_accuracy(state_dict) -> float:
    """Accuracy of the trained weights, evaluated by PyTorch on the held-out quarter."""
    model.load_state_dict(pe.to_torch(state_dict))
    with torch.no_grad():
        predicted = model(torch.from_numpy(x_test)).argmax(1).numpy()
    return float((predicted == y_test).mean())


if __name__ == "__main__":
    program = pe.compile(job, target="host", verbose=True)
    print(f"compiled; planned peak memory of one step: {program.memory_report().peak_bytes / 1024:.0f} KiB")
    rng = np.random.default_rng(0)
    print(f"epoch 0  test accuracy {100 * test_accuracy(program.state_dict()):5.1f}%")
    for epoch in range(1, EPOCHS + 1):
        order = rng.permutation(len(x_train))
        losses = [program.step(x_train[idx], y_train[idx])
                  for idx in (order[i:i + BATCH] for i in range(0, len(order) - BATCH + 1, BATCH))]
        print(f"epoch {epoch}  loss {np.mean(losses):.4f}  "
              f"test accuracy {100 * test_accuracy(program.state_dict()):5.1f}%")
    accuracy = test_accuracy(program.state_dict())
    verdict = "reached" if accuracy >= 0.9 else "did NOT reach"
    print(f"final test accuracy {100 * accuracy:.1f}%: {verdict} the 90% goal")
    raise SystemExit(0 if accuracy >= 0.9 else 1)
