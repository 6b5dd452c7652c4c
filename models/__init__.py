"""prune-cli's model zoo. Importing the package registers every factory (as timm does)."""

from models import resnet, vgg  # noqa: F401  (registration side effects)
from models._registry import (
    MODELS,
    check_file_factory,
    check_file_kwargs,
    create_model,
    list_models,
    register_model,
    resolve_factory,
)

__all__ = [
    "MODELS",
    "check_file_factory",
    "check_file_kwargs",
    "create_model",
    "list_models",
    "register_model",
    "resolve_factory",
]
