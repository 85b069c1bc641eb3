"""Model compression: quantization (quantize.py) and pruning (prune.py)."""
