"""ONNX Runtime on-device training of an exported model: median step time (runs in its own venv, so it
imports nothing from pockengine — hence its own timing loop, like pockengine.timing.median_ms).

    python ort_training.py MODEL.onnx BATCH.npz TRAINED.json REPEATS

onnxruntime-training 1.19 needs onnx 1.16 (it reads IR version <= 10) and numpy 1.x, which
conflict with the main environment: benchmarks/step_time.py exports the model with torch there and
runs this script with the interpreter of `.venv-ort` (created on first use). Prints one JSON line.
ORT's SGD has no momentum; it trains whole tensors only (a channel-ratio weight is trained fully).
"""

import json
import statistics
import sys
import tempfile
import time

import numpy as np
import onnx
from onnxruntime.training import artifacts
from onnxruntime.training.api import CheckpointState, Module, Optimizer


def main(model_path, batch_path, trained_path, repeats):
    model = onnx.load(model_path)
    trained = set(json.load(open(trained_path)))
    initializers = [i.name for i in model.graph.initializer]
    requires_grad = [n for n in initializers if n in trained]
    frozen = [n for n in initializers if n not in trained]
    batch = np.load(batch_path)
    with tempfile.TemporaryDirectory() as out:
        artifacts.generate_artifacts(model, requires_grad=requires_grad, frozen_params=frozen,
                                     loss=artifacts.LossType.CrossEntropyLoss, optimizer=artifacts.OptimType.SGD,
                                     artifact_directory=out)
        state = CheckpointState.load_checkpoint(f"{out}/checkpoint")
        module = Module(f"{out}/training_model.onnx", state)
        optimizer = Optimizer(f"{out}/optimizer_model.onnx", module)
        optimizer.set_learning_rate(0.01)
        module.train()
        x, y = batch["x"], batch["y"]

        def step():
            module(x, y)
            optimizer.step()
            module.lazy_reset_grad()

        for _ in range(3):
            step()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    print(json.dumps({"ms": statistics.median(times) * 1e3, "trained": len(requires_grad), "frozen": len(frozen)}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
