"""What exod knows about models: architectures, inventories, the catalog."""

from .errors import ModelError

__all__ = ["ModelError"]
