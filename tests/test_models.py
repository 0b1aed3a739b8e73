"""The presets' networks: parameter counts and per-block shapes of docs/spec.md 3.7, and
finite gradients (zero inputs included)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import variables as support_variables

from pcjax.configs import cifar10, digits, digits_canvas, imagenet, schema
from pcjax.data import datasets
from pcjax.nn import models

CONFIGS = {
    "cifar10": cifar10,
    "imagenet": imagenet,
    "digits": digits,
    "digits_canvas": digits_canvas,
}

# docs/spec.md 3.7 / 3.9: total real parameters (complex weights count twice) of the network of
# each "<config module>:<preset>".
EXPECTED_PARAMS = {
    "cifar10:mod/rho_psi": 12_251_018,
    "cifar10:mod/linear_plus_rho": 24_459_018,
    "cifar10:mc/rho_psi": 12_251_018,
    "cifar10:mc/linear_plus_rho": 24_459_018,
    "cifar10:tanh/rho_psi": 12_251_018,
    "cifar10:tanh/linear_plus_rho": 24_459_018,
    "cifar10:cst/rho_psi": 12_261_014,
    "cifar10:cst/linear_plus_rho": 24_471_513,
    "cifar10:ms/rho_psi": 12_271_010,
    "cifar10:ms/linear_plus_rho": 24_484_008,
    "imagenet:mod/rho_psi": 29_052_584,
    "imagenet:mod/linear_plus_rho": 53_495_144,
    **{f"imagenet:resnet18/{r}": 11_679_912 for r in models.RESNET_NONLINEARITIES},
}

# block: (spatial out, Std width A, Std width B, Pc out)
IMAGENET_BLOCKS = [
    (112, 27, 54, 32),
    (112, 288, 576, 64),
    (56, 576, 1152, 64),
    (56, 576, 1152, 128),
    (28, 1152, 2304, 256),
    (28, 2304, 4608, 512),
    (14, 4608, 9216, 512),
    (14, 4608, 9216, 512),
    (7, 4608, 9216, 512),
    (6, 4608, 9216, 512),
    (3, 4608, 9216, 256),
]
CIFAR_BLOCKS = [
    (32, 15, 30, 64),
    (16, 320, 640, 128),
    (16, 640, 1280, 256),
    (8, 1280, 2560, 512),
    (8, 2560, 5120, 512),
    (4, 2560, 5120, 512),
    (4, 2560, 5120, 512),
    (2, 2560, 5120, 512),
]


def _build(name, **fields):
    """The network of preset "<config module>:<preset>", with `config.model` fields changed."""
    module, preset = name.split(":")
    cfg = CONFIGS[module].get_config(preset)
    cfg.model.update(fields)
    schema.validate(cfg)
    return schema.build_model(cfg), cfg


def _abstract(name, batch=2):
    model, cfg = _build(name)
    shape = datasets.image_shape(cfg.data.name, cfg.data.image_size)
    x = jax.ShapeDtypeStruct((batch, *shape), jnp.float32)
    variables = jax.eval_shape(
        lambda k: model.init(k, jnp.zeros(x.shape), train=False), jax.random.key(0)
    )
    return model, x, variables


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_parameter_counts(name):
    _, _, variables = _abstract(name)
    assert models.count_params(variables["params"]) == EXPECTED_PARAMS[name]


def test_every_preset_builds():
    for module_name, module in CONFIGS.items():
        for preset in module.PRESETS:
            assert _build(f"{module_name}:{preset}")[0] is not None
    assert len(cifar10.NETWORKS) == 10
    with pytest.raises(ValueError, match="valid choices"):
        cifar10.get_config("relu/rho_psi")


@pytest.mark.parametrize("family,table", [("imagenet", IMAGENET_BLOCKS), ("cifar10", CIFAR_BLOCKS)])
@pytest.mark.parametrize("block_type", ["rho_psi", "linear_plus_rho"])
def test_per_block_shapes(family, table, block_type):
    model, x, variables = _abstract(f"{family}:mod/{block_type}")

    def run(v, x):
        return model.apply(v, x, train=False, capture_intermediates=True, mutable=["intermediates"])

    logits, state = jax.eval_shape(run, variables, x)
    inter = state["intermediates"]
    for b, (size, width_a, width_b, out) in enumerate(table):
        u = inter[f"block{b}"]["__call__"][0]
        assert u.shape == (2, size, size, out) and u.dtype == jnp.complex64, (b, u.shape)
        std_width = width_a if block_type == "rho_psi" else width_b
        assert variables["params"][f"block{b}"]["proj"]["kernel"].shape == (std_width, out, 2)
        mean = variables["batch_stats"][f"block{b}"]["std"]["mean"]
        # Block 0 of the modulus rho_psi net sees a real tensor: its Std is real there.
        real_std = block_type == "rho_psi" and b == 0
        assert mean.shape == ((std_width,) if real_std else (std_width, 2))
    assert logits.shape == (2, 1000 if family == "imagenet" else 10)


NARROW = (4, 6, 6, 8)  # widths


@pytest.mark.slow
@pytest.mark.parametrize("rho", models.TABLE2_NONLINEARITIES)
@pytest.mark.parametrize("block_type", ["rho_psi", "linear_plus_rho"])
def test_gradients_finite_including_zero_images(rho, block_type):
    """Same architecture as the paper's CIFAR nets, narrowed so a real backward pass is cheap."""
    model, _ = _build(f"cifar10:{rho}/{block_type}", widths=NARROW)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 16, 16, 3)).astype(np.float32)
    x[1] = 0  # an all-zero image: zero wavelet coefficients enter every modulus
    labels = jnp.arange(4) % 10
    variables = support_variables.init(model, x, train=True, impl="rbg")

    def loss(params, x):
        logits, _ = model.apply(
            {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
        )
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])

    # One compiled program: op-by-op dispatch of this backward pass costs minutes on 2 cores.
    value, (g_params, g_x) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(
        variables["params"], x
    )
    assert np.isfinite(float(value))
    for g in jax.tree_util.tree_leaves(g_params) + [g_x]:
        assert np.all(np.isfinite(np.asarray(g)))
    assert float(jnp.abs(g_x).sum()) > 0


@pytest.mark.slow
@pytest.mark.parametrize("rho", models.RESNET_NONLINEARITIES)
def test_resnet_gradients_finite(rho):
    model, _ = _build(f"imagenet:resnet18/{rho}", widths=(4, 8, 8, 8))
    model = model.clone(num_classes=5)
    x = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
    variables = support_variables.init(model, x, train=True, impl="rbg")
    assert set(variables["params"]) == {"conv1", "fc"} | {
        f"layer{s}_{i}" for s in range(1, 5) for i in range(2)
    }

    def loss(params):
        out, _ = model.apply(
            {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(out**2)

    grads = jax.jit(jax.grad(loss))(variables["params"])
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree_util.tree_leaves(grads))


@pytest.mark.slow
@pytest.mark.parametrize("block_type", ["rho_psi", "linear_plus_rho"])
def test_remat_changes_neither_values_nor_gradients_nor_names(block_type):
    """`remat=True` recomputes blocks in the backward pass; the maths and the tree stay put."""
    plain, _ = _build(f"cifar10:cst/{block_type}", widths=NARROW)
    remat, _ = _build(f"cifar10:cst/{block_type}", widths=NARROW, remat=True)
    x = np.random.default_rng(1).standard_normal((4, 16, 16, 3)).astype(np.float32)
    variables = support_variables.init(plain, x, train=True)
    remat_shapes = jax.eval_shape(lambda k: remat.init(k, x, train=True), jax.random.key(0))
    assert jax.tree.structure(remat_shapes) == jax.tree.structure(variables)

    def value_and_grad(model):
        def loss(params):
            logits, updates = model.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            return jnp.sum(logits * jnp.arange(10)), updates

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])

    (v0, s0), g0 = value_and_grad(plain)
    (v1, s1), g1 = value_and_grad(remat)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-6)
    # Recomputation compiles to a different program: float32 round-off only (measured <= 7e-5).
    for a, b in zip(jax.tree.leaves((g1, s1)), jax.tree.leaves((g0, s0)), strict=True):
        b = np.asarray(b)
        np.testing.assert_allclose(np.asarray(a), b, rtol=5e-4, atol=1e-5 * np.abs(b).max())
