"""Auto-class registration: importing the package makes AutoConfig/AutoModel/AutoModelForCausalLM know "dsv3"."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_dsv3 import DSV3Config
from .modeling_dsv3 import DSV3ForCausalLM, DSV3Model


def register() -> None:
    """Idempotent: safe to call again (e.g. after a hub folder's remote code registered its own copy)."""
    AutoConfig.register(DSV3Config.model_type, DSV3Config, exist_ok=True)
    AutoModel.register(DSV3Config, DSV3Model, exist_ok=True)
    AutoModelForCausalLM.register(DSV3Config, DSV3ForCausalLM, exist_ok=True)
