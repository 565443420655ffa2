"""malora: mixture-of-LoRA-experts adapters (LoRA, MoLoRA, MALoRA, MoSLD, HydraLoRA) for Hugging Face models.

    from malora import MALoRAConfig, inject_adapters, collect_aux_loss
    inject_adapters(model, MALoRAConfig())
    loss = model(**batch).loss + collect_aux_loss(model)   # batch with attention_mask: padding is not routed
"""

from malora.config import (AdapterConfig, ConfigError, HydraLoRAConfig, LoRAConfig, MALoRAConfig, MoLoRAConfig,
                           MoSLDConfig, config_from_dict, malora_dims)
from malora.layers import (AdapterLayer, HydraLoRALinear, LoRALinear, MALoRALinear, MoLoRALinear, MoSLDLinear,
                           Router, build_adapter_layer, choose_dispatch)
from malora.inject import (adapter_context, adapter_layers, collect_aux_loss, inject_adapters, remove_adapters,
                           reset_routing_stats, routing_stats)
from malora.params import ParamCount, analytic_trainable, count_parameters
from malora.checkpoint import export_peft, load_adapter, save_adapter

__all__ = [
    "AdapterConfig", "AdapterLayer", "ConfigError", "HydraLoRAConfig", "HydraLoRALinear", "LoRAConfig",
    "LoRALinear", "MALoRAConfig", "MALoRALinear", "MoLoRAConfig", "MoLoRALinear", "MoSLDConfig", "MoSLDLinear",
    "ParamCount", "Router", "adapter_context", "adapter_layers", "analytic_trainable", "build_adapter_layer", "choose_dispatch",
    "collect_aux_loss", "config_from_dict", "count_parameters", "export_peft", "inject_adapters", "load_adapter",
    "malora_dims", "remove_adapters", "reset_routing_stats", "routing_stats", "save_adapter",
]
