"""The metric sinks (`training.summaries`): one JSON line per logged step and TensorBoard scalars, written
without importing torch (tensorboardX would import it, for seconds, whenever it is installed)."""
import json
import subprocess
import sys
import textwrap

from tensorboard.backend.event_processing import event_accumulator


def test_metrics_and_tensorboard_scalars_are_written_without_importing_torch(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from lmops_jax.training import summaries
        writer = summaries.MetricsWriter({str(tmp_path)!r}, enabled=True)
        writer.write(3, {{"loss": 1.25}})
        writer.close()
        assert "torch" not in sys.modules, "writing TensorBoard events imported torch"
        import torch  # hidden only for tensorboardX's import: the process can still import it
        print("torch", torch.__version__)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.startswith("torch ")
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 3, "loss": 1.25}
    events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(3, 1.25)]
