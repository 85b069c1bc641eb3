"""Inference: pure decoding (`decoding`, `beam_search`), `InferenceModule` (generate / score / logits
of a loaded model) and the batch inference job (`infer`). Never imports training, distillation or
data; models are loaded through `lmops_jax.models`."""
from lmops_jax.inference.inference_module import GenerateOutput, InferenceModule

__all__ = ["GenerateOutput", "InferenceModule"]
