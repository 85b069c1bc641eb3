"""Test set-up: 8 host CPU devices so sharding is real, and TensorFlow kept off any accelerator."""
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# The MFU peak cache (training.flops) and the jobs' compilation cache (cli.compile_cache) go to a folder of
# this test process, not the user's ~/.cache.
CACHE_HOME = tempfile.mkdtemp(prefix="lmops_jax_test_cache_")
os.environ["XDG_CACHE_HOME"] = CACHE_HOME


def pytest_unconfigure(config):
    """Removes this process's cache folder when its session ends (in the controller and in each xdist worker).
    An `atexit` handler left one folder behind in a run of tests/serving; this hook runs inside the session."""
    shutil.rmtree(CACHE_HOME, ignore_errors=True)
