"""What exod knows about models: architectures, inventories, the catalog."""

import importlib.abc
import importlib.util
import sys
from pathlib import Path

from .errors import ModelError

__all__ = ["ModelError"]

# Model classes exod brings for model types the installed mlx-lm lacks:
# mlx_lm.models.<name> -> a file here. The finder sits last on sys.meta_path,
# so it answers only when mlx-lm itself has no such module (a release that
# brings one wins) and nothing is imported until mlx-lm asks.
OWN_CLASSES = {"deepseek_v4": Path(__file__).with_name("deepseek_v4_model.py")}


class _OwnClassFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        prefix, _, name = fullname.rpartition(".")
        if prefix != "mlx_lm.models" or name not in OWN_CLASSES:
            return None
        return importlib.util.spec_from_file_location(fullname, OWN_CLASSES[name])


if not any(isinstance(f, _OwnClassFinder) for f in sys.meta_path):
    sys.meta_path.append(_OwnClassFinder())
