"""DeepSeek-V3 for the Hugging Face ecosystem: config, model, latent cache, checkpoint I/O, Auto registration."""

from .configuration_dsv3 import DSV3Config
from .modeling_dsv3 import DSV3ForCausalLM, DSV3Model, DSV3PreTrainedModel
from .registration import register

register()

__all__ = ["DSV3Config", "DSV3PreTrainedModel", "DSV3Model", "DSV3ForCausalLM", "register"]
