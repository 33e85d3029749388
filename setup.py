"""Package list derived from the tree: every folder with an ``__init__.py`` under the five roots, so a new block
module or kernel folder ships with no list to edit. supernets/, kernels/, search_spaces/ and hardware_profiles/
install inside the ``nas`` namespace (no top-level ``kernels`` package lands in site-packages)."""

from pathlib import Path

from setuptools import setup

ROOTS = {
    "nas": "nas",
    "nas.supernets": "supernets",
    "nas.kernels": "kernels",
    "nas.search_spaces": "search_spaces",
    "nas.hardware_profiles": "hardware_profiles",
}


def packages() -> list[str]:
    here = Path(__file__).parent
    found = []
    for package, folder in ROOTS.items():
        for init in sorted((here / folder).rglob("__init__.py")):
            relative = init.parent.relative_to(here / folder)
            if "__pycache__" in relative.parts:
                continue
            found.append(".".join([package, *relative.parts]))
    return found


setup(package_dir=ROOTS, packages=packages())
