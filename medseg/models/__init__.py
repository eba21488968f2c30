"""Network factory: ``build_model(config.model, in_channels, num_classes)`` picks a registry entry by name."""

from medseg.models.registry import MODEL_REGISTRY, build_model

__all__ = ["MODEL_REGISTRY", "build_model"]
