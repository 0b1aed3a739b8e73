"""Every experiment preset builds, validates, and states the reference recipe's numbers."""

import os
import sys

import pytest

from pcjax import config_lib, models

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments", "configs")
)
import cifar10  # noqa: E402
import digits  # noqa: E402
import imagenet  # noqa: E402


@pytest.mark.parametrize("module", [cifar10, imagenet])
def test_every_preset_validates(module):
    for preset in module.PRESETS:
        for suffix in ("", ",smoke"):
            cfg = module.get_config(preset + suffix)
            config_lib.validate(cfg, device_count=8)
            assert cfg.model.name in models.MODEL_NAMES


def test_reference_recipes():
    c = cifar10.get_config("ms/linear_plus_rho")
    assert (
        c.data.global_batch_size,
        c.optim.learning_rate,
        c.optim.num_epochs,
        c.optim.lr_decay_epochs,
        c.optim.weight_decay,
        c.optim.momentum,
        c.optim.nesterov,
    ) == (128, 0.01, 300, 70, 1e-4, 0.9, False)
    i = imagenet.get_config("mod/rho_psi")
    assert (
        i.model.name,
        i.data.global_batch_size,
        i.optim.learning_rate,
        i.optim.num_epochs,
        i.optim.lr_decay_epochs,
    ) == ("imagenet/mod/rho_psi", 128, 0.01, 150, 45)
    r = imagenet.get_config("resnet18/thresh")
    assert (
        r.model.name,
        r.data.global_batch_size,
        r.optim.learning_rate,
        r.optim.num_epochs,
        r.optim.lr_decay_epochs,
    ) == ("resnet18/thresh", 256, 0.1, 90, 30)
    config_lib.validate(digits.get_config(), device_count=8)


@pytest.mark.parametrize("module", [cifar10, imagenet, digits])
def test_unknown_preset_names_choices(module):
    with pytest.raises(ValueError, match="valid choices"):
        module.get_config("nope")
