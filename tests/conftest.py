"""Test set-up: 8 host CPU devices so sharding is real, and TensorFlow kept off any accelerator."""
import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# The MFU peak cache (training.flops) and the jobs' compilation cache (cli.compile_cache) go to a folder of
# this test process, not the user's ~/.cache, removed when the process exits.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="lmops_jax_test_cache_")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)
