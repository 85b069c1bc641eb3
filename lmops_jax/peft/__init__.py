"""Parameter-efficient fine-tuning: LoRA adapters through qwix (`lmops_jax.peft.lora`)."""
from lmops_jax.peft.lora import LoraModel, adapter_params, base_params, export_merged, merge_lora

__all__ = ["LoraModel", "adapter_params", "base_params", "export_merged", "merge_lora"]
