"""Models: `create_model(name, **kwargs)` over a registry (CT classifiers, RGB autoencoder)."""

from training.models import autoencoder, fusion  # noqa: F401  (registers the models)
from training.models.registry import create_model, list_models, register

__all__ = ["create_model", "list_models", "register"]
