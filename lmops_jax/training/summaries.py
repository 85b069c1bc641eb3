"""Metric sinks: `MODEL_DIR/metrics.jsonl` (one JSON object per logged step) and TensorBoard events.

Only process 0 writes; other processes get a writer that drops everything, so callers need no checks.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Mapping

import jax


def tensorboard_writer_class() -> type:
    """tensorboardX's `SummaryWriter`, imported without importing torch.

    tensorboardX imports torch whenever it is installed, only so that it can take torch tensors; this writer
    is given Python floats. That import costs a training job about 3 s at start and 1 s at exit when torch is
    installed (as it is beside transformers), so torch is hidden for the one import. A torch the process has
    already imported, or imports later, is untouched.
    """
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """Appends `{"step": int, name: float, ...}` lines (floats at full precision) and TB scalars."""

    def __init__(self, model_dir: str, *, enabled: bool | None = None, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(model_dir, exist_ok=True)
        self._jsonl = open(os.path.join(model_dir, "metrics.jsonl"), "a", encoding="utf-8")
        if tensorboard:
            self._tb = tensorboard_writer_class()(os.path.join(model_dir, "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step)}
        record.update({k: float(v) for k, v in metrics.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for name, value in record.items():
                if name != "step":
                    self._tb.add_scalar(name, value, int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
