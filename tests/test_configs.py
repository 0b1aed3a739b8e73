"""Every experiment preset builds, validates, and states the reference recipe's numbers."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pcjax.configs import cifar10, digits, digits_canvas, imagenet, schema
from pcjax.nn import models


@pytest.mark.parametrize("module", [cifar10, imagenet])
def test_every_preset_validates(module):
    for preset in module.PRESETS:
        for suffix in ("", ",smoke"):
            cfg = module.get_config(preset + suffix)
            schema.validate(cfg, device_count=8)
            assert cfg.model.name.endswith(preset)  # the preset label
        # ",smoke": tiny widths for every preset, the ResNet-18 baseline's included.
        smoke = module.get_config(preset + ",smoke").model.widths
        assert max(smoke) <= 8, (preset, smoke)


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
    schema.validate(digits.get_config(), device_count=8)


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
    """file:preset and --config.model.<field> overrides reach the built network."""
    from absl import flags
    from ml_collections import config_flags

    from pcjax import configs

    argv = [
        "prog",
        f"--config={configs.path('cifar10')}:cst/linear_plus_rho,smoke",
        "--config.model.widths=(16,16,32)",
        "--config.model.num_angles=8",
        "--config.model.threshold_init=0.5",
    ]
    fv = flags.FlagValues()
    # config_flags registers the override flags from the command line it is given.
    config_flags.DEFINE_config_file(
        "config", configs.path("cifar10"), flag_values=fv, sys_argv=argv
    )
    fv(argv)
    cfg = fv.config
    assert cfg.model.name == "cifar10/cst/linear_plus_rho" and cfg.train.num_steps == 2
    schema.validate(cfg)
    model = schema.build_model(cfg)
    assert (model.widths, model.num_angles) == ((16, 16, 32), 8)
    assert model.nonlinearity_init == {"threshold": 0.5}
    with pytest.raises(ValueError, match="valid choices"):
        configs.path("mnist")


# --- The architecture as config fields -------------------------------------------------------


def _param_count(config) -> int:
    model = schema.build_model(config)
    size = config.data.image_size or {"cifar10": 32, "imagenet2012": 224}[config.data.name]
    x = jnp.zeros((1, size, size, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    return models.count_params(variables["params"])


CIFAR10_WIDTHS = (64, 128, 256, 512, 512, 512, 512, 512)  # docs/spec.md 3.7
IMAGENET_WIDTHS = (32, 64, 64, 128, 256, 512, 512, 512, 512, 512, 256)


@pytest.mark.parametrize(
    "module,preset,name,fields",
    [
        (cifar10, "mod/rho_psi", "cifar10/mod/rho_psi", (CIFAR10_WIDTHS, 4, 0, "mod", "rho_psi")),
        (
            cifar10,
            "cst/linear_plus_rho",
            "cifar10/cst/linear_plus_rho",
            (CIFAR10_WIDTHS, 4, 0, "cst", "linear_plus_rho"),
        ),
        (
            cifar10,
            "ms/rho_psi/L16_full",
            "cifar10/ms/rho_psi/L16_full",
            (CIFAR10_WIDTHS, 16, 0, "ms", "rho_psi"),
        ),
        (
            imagenet,
            "mod/linear_plus_rho",
            "imagenet/mod/linear_plus_rho",
            (IMAGENET_WIDTHS, 8, 1, "mod", "linear_plus_rho"),
        ),
        (digits, "default", "digits/mod/rho_psi", ((32, 64, 64), 8, 0, "mod", "rho_psi")),
        (
            digits_canvas,
            "default",
            "digits_canvas/mod/rho_psi",
            ((16, 32, 32, 64), 8, 0, "mod", "rho_psi"),
        ),
    ],
)
def test_preset_fields_are_the_network(module, preset, name, fields):
    """A preset writes its network into config.model; build_model builds exactly that."""
    cfg = module.get_config(preset)
    schema.validate(cfg)
    assert cfg.model.name == name
    model = schema.build_model(cfg)
    assert isinstance(model, models.PhaseCollapseNet)
    got = (model.widths, model.num_angles, model.num_standard_blocks)
    assert got + (model.nonlinearity, model.block_type) == fields
    assert model.full_angles == (model.num_angles == 16)
    assert model.num_classes == (1000 if module is imagenet else 10)


def test_resnet_preset_fields_are_the_network():
    cfg = imagenet.get_config("resnet18/thresh")
    schema.validate(cfg)
    assert cfg.model.name == "resnet18/thresh"
    model = schema.build_model(cfg)
    assert isinstance(model, models.ResNet18)
    assert (model.widths, model.nonlinearity, model.num_classes) == (
        (64, 128, 256, 512),
        "thresh",
        1000,
    )


def test_config_is_locked_and_typed():
    """ml_collections itself refuses an unknown key or a value of another type, naming it;
    validate refuses what bypasses the lock (a replaced section)."""
    cfg = cifar10.get_config("mod/rho_psi")
    with pytest.raises(AttributeError, match=r"lrr.*learning_rate"):
        cfg.optim.lrr = 0.1
    with pytest.raises(TypeError, match=r"'learning_rate'.*fast.*float"):
        cfg.optim.learning_rate = "fast"
    with pytest.raises(TypeError, match=r"'num_angles'.*float.*int"):
        cfg.model.num_angles = 8.5
    with pytest.raises(TypeError, match=r"'image_size'.*str.*int"):
        cfg.data.image_size = "64"  # a placeholder keeps its declared type
    cfg.data.image_size = 64
    cfg.data.image_size = None  # and may be unset again
    cfg.optim.learning_rate = 1  # an int is a float
    assert cfg.optim.learning_rate == 1.0 and isinstance(cfg.optim.learning_rate, float)
    cfg.optim = ml_collections.ConfigDict({**cfg.optim.to_dict(), "lrr": 0.1})
    with pytest.raises(schema.ConfigError, match=r"lrr.*learning_rate"):
        schema.validate(cfg)


@pytest.mark.slow
def test_override_num_angles_on_cifar_preset_builds_and_runs():
    cfg = cifar10.get_config("mod/rho_psi")
    cfg.model.num_angles = 8
    schema.validate(cfg)
    model = schema.build_model(cfg)
    assert model.num_angles == 8 and all(k["num_angles"] == 8 for k in model.block_kwargs())
    # Each projection maps (L + 1) C_in channels to C_out complex ones (2 reals per weight), so
    # L = 8 instead of 4 adds 2 * 4 * C_in * C_out real parameters per block.
    c_in = (3, 64, 128, 256, 512, 512, 512, 512)
    c_out = CIFAR10_WIDTHS
    extra = sum(2 * 4 * i * o for i, o in zip(c_in, c_out, strict=True))
    assert _param_count(cfg) - _param_count(cifar10.get_config("mod/rho_psi")) == extra
    cfg.model.widths = (4, 4)  # forward on real data at a width the test can afford
    model = schema.build_model(cfg)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    variables = model.init(jax.random.key(0), x, train=False)
    logits = model.apply(variables, x, train=False)
    assert logits.shape == (2, 10) and bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.slow
def test_every_field_reaches_the_network():
    cfg = cifar10.get_config("cst/linear_plus_rho")
    cfg.model.update(
        widths=(8, 16, 16),
        num_angles=6,
        full_angles=True,
        num_standard_blocks=1,
        block_type="rho_psi",
        threshold_init=0.3,
        learn_nonlinearity=False,
        wavelet_method="fft",
        precision="bf16",
    )
    schema.validate(cfg)
    model = schema.build_model(cfg)
    assert (model.widths, model.num_angles, model.full_angles, model.num_standard_blocks) == (
        (8, 16, 16),
        6,
        True,
        1,
    )
    assert (model.block_type, model.nonlinearity, model.nonlinearity_init) == (
        "rho_psi",
        "cst",
        {"threshold": 0.3},
    )
    assert (model.learn_nonlinearity, model.wavelet_method, model.precision) == (
        False,
        "fft",
        "bf16",
    )
    blocks = model.block_kwargs()
    assert [b["filter_mode"] for b in blocks] == ["standard", "factorized_even", "factorized_odd"]
    assert all(b["full_angles"] for b in blocks)
    # A learned threshold starts at threshold_init; a fixed one is no parameter at all.
    cfg.model.learn_nonlinearity = True
    x = jnp.ones((1, 32, 32, 3))
    params = jax.eval_shape(
        lambda: schema.build_model(cfg).init(jax.random.key(0), x, train=False)
    )["params"]
    assert "rho_threshold" in params["block0"]
    init = schema.build_model(cfg).init(jax.random.key(0), x, train=False)["params"]
    np.testing.assert_allclose(init["block1"]["rho_threshold"], 0.3)


def test_resnet_arch_on_cifar_builds():
    cfg = cifar10.get_config("mod/rho_psi")
    cfg.model.update(arch="resnet18", widths=(4, 8, 8, 8), nonlinearity="thresh")
    schema.validate(cfg)
    model = schema.build_model(cfg)
    assert isinstance(model, models.ResNet18) and model.num_classes == 10


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"arch": "vgg"}, r"config.model.arch='vgg'.*valid choices"),
        ({"nonlinearity": "relu"}, r"config.model.nonlinearity='relu'.*valid choices"),
        ({"block_type": "skip"}, r"config.model.block_type='skip'.*valid choices"),
        ({"num_angles": 0}, r"config.model.num_angles=0"),
        ({"num_angles": 4, "full_angles": True}, r"config.model.num_angles=4.*full_angles.*> 4"),
        ({"num_angles": 2}, r"config.model.num_angles=2.*> 2"),
        ({"num_standard_blocks": 9}, r"config.model.num_standard_blocks=9"),
        ({"threshold_init": 0.2}, r"config.model.threshold_init=0.2.*'mod'.*\('cst',\)"),
        ({"nonlinearity": "cst", "threshold_init": -1.0}, r"threshold_init=-1.0 must be >= 0"),
        ({"widths": ()}, r"config.model.widths=\(\)"),
        ({"widths": (8,) * 9}, r"config.model.widths.*2x2"),
        ({"arch": "resnet18"}, r"config.model.nonlinearity='mod'.*valid choices"),
        ({"arch": "resnet18", "nonlinearity": "relu"}, r"resnet18 has 4 stages"),
        ({"precision": "float16"}, r"config.model.precision='float16'.*valid choices"),
    ],
)
def test_impossible_models_rejected_before_building(fields, message):
    cfg = cifar10.get_config("mod/rho_psi")
    cfg.model.update(fields)
    with pytest.raises(schema.ConfigError, match=message):
        schema.validate(cfg)


def test_full_angle_presets():
    for rho_bt in cifar10.NETWORKS:
        cfg = cifar10.get_config(rho_bt + "/L16_full")
        schema.validate(cfg)
        assert (cfg.model.num_angles, cfg.model.full_angles) == (16, True)
        assert cfg.model.name == f"cifar10/{rho_bt}/L16_full"
        base = cifar10.get_config(rho_bt)
        assert (base.model.num_angles, base.model.full_angles) == (4, False)


def test_expected_numbers_only_where_the_paper_gives_them():
    known = {p: v for p, (v, _) in cifar10.EXPECTED_TEST_ERROR.items() if v is not None}
    assert known == {
        "mod/rho_psi": 11.7,
        "mod/linear_plus_rho": 7.7,
        "cst/linear_plus_rho": 22.5,
        "mod/rho_psi/L16_full": 11.7,
        "mod/linear_plus_rho/L16_full": 7.7,
        "cst/linear_plus_rho/L16_full": 22.5,
    }
    known = {p: v for p, (v, _) in imagenet.EXPECTED_ERROR.items() if v is not None}
    assert known == {"mod/rho_psi": (35.9, 15.2), "mod/linear_plus_rho": (30.1, 11.0)}
    for table in (cifar10.EXPECTED_TEST_ERROR, imagenet.EXPECTED_ERROR):
        for value, source in table.values():
            assert ("poster" in source) if value is not None else source.startswith("unknown")


def test_remat_is_a_phase_collapse_field():
    cfg = imagenet.get_config("mod/rho_psi")
    cfg.model.remat = True
    schema.validate(cfg)
    assert schema.build_model(cfg).remat
    cfg = imagenet.get_config("resnet18/relu")
    cfg.model.remat = True
    with pytest.raises(schema.ConfigError, match=r"config.model.remat=True.*phase_collapse"):
        schema.validate(cfg)
