"""Networks: ``build_model(config.model, in_channels, num_classes)`` picks a registry entry by name
(:mod:`medseg.models.registry`; importing it loads no torch)."""

from medseg.models.registry import MODEL_REGISTRY, NetworkEntry, build_model, register_network

__all__ = ["MODEL_REGISTRY", "NetworkEntry", "build_model", "register_network"]
