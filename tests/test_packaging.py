"""Every Python package under the mapped folders is installed under exod."""

import tomllib

from .conftest import REPO


def test_every_package_folder_is_listed():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    for name, folder in config["package-dir"].items():
        assert name in listed
        for init in (REPO / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO / folder)
            dotted = ".".join((name, *relative.parts)) if relative.parts else name
            assert dotted in listed, f"{dotted} ({init.parent}) is not in [tool.setuptools] packages"
