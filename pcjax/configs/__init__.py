"""Experiment configs, one module per dataset, each with `get_config(preset)` and `PRESETS`.

Importable (`from pcjax.configs import cifar10`) and usable as config_flags files
(`--config=pcjax/configs/cifar10.py:mod/rho_psi,smoke`); `path(name)` gives the file of a module.
"""

from __future__ import annotations

import os

NAMES = ("digits", "digits_canvas", "cifar10", "imagenet")


def path(name: str) -> str:
    """File of config module `name` (for `config_flags` and the experiment mains)."""
    if name not in NAMES:
        raise ValueError(f"Unknown config {name!r}; valid choices: {NAMES}.")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
