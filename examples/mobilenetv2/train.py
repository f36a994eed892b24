"""Train a MobileNetV2 (width 0.35; BatchNorm, ReLU6, depthwise convolutions) at 64x64.

The data are scikit-learn's bundled digits, upscaled from 8x8 to 64x64 and repeated over three
channels, so the example needs no download.

    python examples/mobilenetv2/train.py
    pockengine build examples/mobilenetv2/train.py -o build/mobilenetv2
"""

import numpy as np
import torch
from mobilenetv2 import MobileNetV2
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import pockengine as pe

BATCH = 8
RESOLUTION = 64
STEPS = 150


def as_images(flat: np.ndarray) -> np.ndarray:
    """(N, 64) digits in [0, 16] -> (N, 3, 64, 64) float32, normalised."""
    small = flat.reshape(-1, 1, 8, 8) / 16.0
    big = small.repeat(RESOLUTION // 8, axis=2).repeat(RESOLUTION // 8, axis=3)
    return ((big.repeat(3, axis=1) - 0.5) / 0.5).astype("float32")


torch.manual_seed(0)
digits, labels = load_digits(return_X_y=True)
x_train, x_test, y_train, y_test = train_test_split(digits, labels.astype("int64"), test_size=0.2, random_state=0)
model = MobileNetV2(num_classes=10, width_mult=0.35).train()

job = pe.TrainingJob(
    model=model,
    example_inputs=(torch.from_numpy(as_images(x_train[:BATCH])),),
    example_targets=torch.from_numpy(y_train[:BATCH]),
    loss="cross_entropy",
    optimizer=pe.optim.SGD(lr=0.05, momentum=0.9, weight_decay=4e-5),
    name="mobilenetv2",
)


def test_accuracy(state_dict) -> float:
    model.load_state_dict(pe.to_torch(state_dict))
    model.eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(as_images(x_test))).argmax(1).numpy()
    model.train()
    return float((predicted == y_test).mean())


if __name__ == "__main__":
    program = pe.compile(job, target="host", verbose=True)
    print(program.memory_report())
    rng = np.random.default_rng(0)
    for step in range(1, STEPS + 1):
        idx = rng.choice(len(x_train), BATCH, replace=False)
        loss = program.step(as_images(x_train[idx]), y_train[idx])
        if step % 25 == 0:
            print(f"step {step}  loss {loss:.4f}  test accuracy {100 * test_accuracy(program.state_dict()):.1f}%")
