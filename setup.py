"""lmops_jax: distillation, fine-tuning and serving of language models in JAX/Flax."""
import setuptools

CORE = [
    "jax==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "gin-config==0.5.0",
    "numpy>=1.26",
    "tensorboardX>=2.6",
]
DATA = [
    "seqio==0.0.20",
    "tensorflow==2.21.0",
    "tensorflow-text==2.21.1",
    "tensorflow-datasets==4.9.10",
    "sentencepiece>=0.2",
    "tokenizers>=0.20,<0.24",  # Hugging Face tokenizer.json vocabularies (data/hf_tokenizer.py)
]
PEFT = ["qwix==0.1.8"]
VIEWER = ["tensorboard>=2.20,<3"]  # `tensorboard --logdir MODEL_DIR` (the run writes events with tensorboardX)
T5 = ["t5==0.9.4"]
SERVE = ["fastapi>=0.165,<1", "uvicorn>=0.54,<1", "prometheus_client>=0.26,<1",
         "jinja2>=3.1,<4"]  # `python -m lmops_jax.serve`; jinja2 renders a model's own chat template
RAY = ["ray[serve]==2.60.0"]  # `python -m lmops_jax.serving.ray_app`: replicas and autoscaling on Ray Serve
DEV = ["pytest>=8", "pytest-xdist>=3.5", "torch==2.13.0", "transformers>=5,<6", "safetensors>=0.4",
       "httpx>=0.28,<1", "openai>=3.57,<4"]  # httpx: in-process server tests; openai: the client test

setuptools.setup(
    name="lmops_jax",
    version="0.1.0",
    description="Distillation, fine-tuning and serving of language models in JAX/Flax.",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["lmops_jax", "lmops_jax.*"]),
    package_data={"lmops_jax": ["data/corpus/*.txt", "data/seq2seq/*.tsv", "gin_configs/*/*.gin"]},
    include_package_data=True,
    install_requires=CORE,
    extras_require={
        "data": DATA,
        "peft": PEFT,
        "t5": T5,  # install after [all]: it swaps seqio/tfds for the nightlies it pins
        "tensorboard": VIEWER,
        "serve": SERVE,
        "ray": SERVE + RAY,
        "dev": DEV,
        "all": DATA + PEFT + VIEWER + SERVE + RAY,  # `pip check` stays clean with ray (docs/serving.md)
    },
)
