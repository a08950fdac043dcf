"""LoRA fine-tuning of the visual decoder (with its refiner) and the LLM through peft.

Adapters are injected in place, so the parameter names of everything else stay those of the checkpoint.
In a LoRA run a stage trains only the adapters of the components that have them; components without
adapters (vision, adapter, vte, vae) still train fully when a stage names them.
"""

from __future__ import annotations

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn


def _targets(module: nn.Module, suffixes) -> list[str]:
    return sorted({name for name, m in module.named_modules() if isinstance(m, nn.Linear)
                   and any(name == s or name.endswith("." + s) for s in suffixes)})


def apply_lora(model, args) -> None:
    for component, suffixes in (("decoder", args.decoder_targets), ("refiner", args.refiner_targets),
                                ("llm", args.llm_targets)):
        module = getattr(model, component)
        targets = _targets(module, suffixes)
        if not targets:
            raise ValueError(f"LoRA targets {suffixes} match no Linear layer of the {component}")
        cfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=targets)
        inject_adapter_in_model(cfg, module)


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in module.named_parameters() if "lora_" in n]


def merge_lora(model) -> None:
    """Fold every adapter into its base Linear and put the plain Linear back (checkpoint names restored)."""
    for component in ("decoder", "refiner", "llm"):
        root = getattr(model, component)
        for name, m in list(root.named_modules()):
            if isinstance(m, LoraLayer):
                m.merge()
                parent_name, _, child = name.rpartition(".")
                parent = root.get_submodule(parent_name) if parent_name else root
                setattr(parent, child, m.get_base_layer())
