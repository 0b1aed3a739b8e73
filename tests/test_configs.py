"""Every experiment preset builds, validates, and states the reference recipe's numbers."""

import pytest

from pcjax import config_lib, models
from pcjax.configs import cifar10, digits, digits_canvas, imagenet


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


@pytest.mark.parametrize("module", [cifar10, imagenet, digits, digits_canvas])
def test_unknown_preset_names_choices(module):
    with pytest.raises(ValueError, match="valid choices"):
        module.get_config("nope")
    with pytest.raises(ValueError, match="valid choices"):
        module.get_config(module.PRESETS[0] + ",fast")


@pytest.mark.parametrize("module", [digits, digits_canvas])
def test_smoke_alone_is_the_first_preset_shrunk(module):
    assert module.get_config("smoke").to_dict() == module.get_config("default,smoke").to_dict()
    assert module.get_config("smoke").train.num_steps < 10


def test_config_files_load_through_config_flags():
    from absl import flags
    from ml_collections import config_flags

    from pcjax import configs

    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", configs.path("cifar10"), flag_values=fv)
    fv(["prog", f"--config={configs.path('cifar10')}:cst/linear_plus_rho,smoke"])
    assert fv.config.model.name == "cifar10/cst/linear_plus_rho"
    assert fv.config.train.num_steps == 2
    with pytest.raises(ValueError, match="valid choices"):
        configs.path("mnist")
