"""pcjax against outputs of the authors' PyTorch code (tests/golden/reference_outputs.npz).

The file is written by tests/golden/generate_golden.py from a checkout of their repository; the
weights it used are stored in it (small models) or regenerated here by the same NumPy function
(the ResNet-18). Reference layouts are NCHW with complex weights as (K, C, 1, 1, 2) real pairs;
pcjax is NHWC with kernels [C, K, 2]. Everything runs at the "highest" precision policy, train
mode (batch statistics), and is compared at float32 tolerance.
"""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import variables as support_variables

from pcjax.configs import schema
from pcjax.nn import layers, models
from pcjax.training import train

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "golden"))
import generate_golden as golden  # noqa: E402  (only its NumPy weight functions are used)

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "reference_outputs.npz")
BLOCK_TYPE = {"A": "rho_psi", "B": "linear_plus_rho"}


@pytest.fixture(scope="module")
def ref():
    with np.load(GOLDEN) as f:
        return {k: f[k] for k in f.files}


def _nhwc(x):
    return np.transpose(x, (0, 2, 3, 1))


def _params_of(ref, prefix):
    """{torch name: array} of one case."""
    head = prefix + "params/"
    return {k[len(head) :]: v for k, v in ref.items() if k.startswith(head)}


def _kernel(p):
    """(K, C, 1, 1, 2) -> [C, K, 2]."""
    return np.transpose(p[:, :, 0, 0, :], (1, 0, 2))


def _block_params(torch_params, block_index, rho):
    """pcjax parameters of block `block_index` from the reference's (module index b + 1)."""
    mine = {k: v for k, v in torch_params.items() if k.startswith(f"module.{block_index + 1}.")}
    (kernel,) = [v for k, v in mine.items() if k.endswith(".param")]
    params = {"proj": {"kernel": jnp.asarray(_kernel(kernel))}}
    for k, v in mine.items():
        if k.endswith(".gain"):
            params["rho_gain"] = jnp.asarray(v.reshape(-1))
        elif k.endswith(".bias"):
            name = "rho_threshold" if rho == "cst" else "rho_bias"
            params[name] = jnp.asarray(v.reshape(-1))
    return params


def _run_blocks(net, torch_params, x, rho):
    outs, u = [], jnp.asarray(x)
    for b, kw in enumerate(net.block_kwargs()):
        block = layers.PhaseCollapseBlock(**kw)
        v = block.init(jax.random.key(0), u, train=True)
        v = {"params": _block_params(torch_params, b, rho), "batch_stats": v["batch_stats"]}
        u, _ = block.apply(v, u, train=True, mutable=["batch_stats"])
        outs.append(np.asarray(u))
    return outs


# Outputs are unit-norm pixel vectors (entries O(0.1-1)); float32 FFTs, statistics and matmuls on
# both sides differ by a few 1e-7 (measured max 5-10e-7, median 1e-7).
ATOL = 3e-6


def _assert_close(got, want, rho="mod"):
    """Every entry within ATOL, except for `ms`: near z = 0 it is ~z / (2 |z|), the phase of a
    tiny coefficient, whose condition number is 1 / |z| (measured max 6e-5 on one entry of
    12,288); there 99 % of the entries must be within ATOL and all within 1e-4."""
    diff = np.abs(np.asarray(got) - want)
    if rho == "ms":
        assert np.quantile(diff, 0.99) <= ATOL and diff.max() <= 1e-4, diff.max()
    else:
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("variant", ["A", "B"])
@pytest.mark.parametrize("rho", ["mod", "cst", "ms", "tanh"])
def test_cifar_block_matches_reference(ref, variant, rho):
    key = f"block/{variant}/{rho}"
    net = models.PhaseCollapseNet(
        widths=(6,),
        num_classes=10,
        num_angles=4,
        block_type=BLOCK_TYPE[variant],
        nonlinearity=rho,
    )
    x = _nhwc(golden.golden_input(key, (2, 3, 32, 32)))
    (got,) = _run_blocks(net, _params_of(ref, key + "/"), x, rho)
    _assert_close(got, _nhwc(ref[key + "/y"]), rho)


@pytest.mark.slow
def test_imagenet_standard_and_odd_blocks_match_reference(ref):
    net = models.PhaseCollapseNet(
        widths=(4, 4, 4),
        num_classes=1000,
        num_angles=8,
        num_standard_blocks=1,
        block_type="linear_plus_rho",
    )
    x = _nhwc(golden.golden_input("imagenet", (1, 3, 224, 224)))
    outs = _run_blocks(net, _params_of(ref, "imagenet/"), x, "mod")
    _assert_close(outs[0][:, ::4, ::4], _nhwc(ref["imagenet/standard/y"]))
    _assert_close(outs[2][:, ::4, ::4], _nhwc(ref["imagenet/odd/y"]))


def _sgd_params(torch_params):
    params = {f"block{b}": _block_params(torch_params, b, "mod") for b in range(4)}
    params["head"] = {
        "bn": {
            "scale": jnp.asarray(torch_params["module.6.bn.weight"]),
            "bias": jnp.asarray(torch_params["module.6.bn.bias"]),
        },
        "linear": {
            "kernel": jnp.asarray(torch_params["module.6.classifier.weight"].T),
            "bias": jnp.asarray(torch_params["module.6.classifier.bias"]),
        },
    }
    return params


@pytest.mark.slow
def test_one_sgd_step_of_cifar_variant_b_matches_reference(ref):
    """Loss, logits and every parameter after one step of pcjax's own optimizer and train step
    (lr 0.01, momentum 0.9, coupled weight decay 1e-4: the default recipe, as torch.optim.SGD)
    of a 4-block variant-B net."""
    net = models.PhaseCollapseNet(
        widths=(4, 6, 6, 8), num_classes=10, num_angles=4, block_type="linear_plus_rho"
    )
    x = jnp.asarray(_nhwc(golden.golden_input("sgd", (4, 3, 32, 32))))
    labels = jnp.asarray(ref["sgd/labels"])
    stats = support_variables.init(net, x, train=True, impl="rbg")["batch_stats"]
    params = _sgd_params(_params_of(ref, "sgd/"))
    cfg = schema.default_config()
    assert (cfg.optim.learning_rate, cfg.optim.momentum, cfg.optim.weight_decay) == (
        0.01,
        0.9,
        1e-4,
    )
    tx = train.create_optimizer(cfg, steps_per_epoch=1)
    state = train.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=stats,
        opt_state=tx.init(params),
        apply_fn=net.apply,
        tx=tx,
    )
    # One compiled program (op-by-op dispatch of the backward pass is far slower on CPU).
    step = jax.jit(
        functools.partial(train.train_step, learning_rate_fn=train.learning_rate_schedule(cfg, 1))
    )
    after_state, metrics = step(state, {"image": x, "label": labels})
    np.testing.assert_allclose(metrics["loss"], ref["sgd/loss"], rtol=1e-5)
    logits, _ = jax.jit(
        lambda p: net.apply(
            {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
        )
    )(params)
    np.testing.assert_allclose(logits, ref["sgd/logits"], rtol=0, atol=1e-4)
    want = _sgd_params({k[len("sgd/after/") :]: v for k, v in ref.items() if "sgd/after/" in k})
    for (path, got), w in zip(
        jax.tree_util.tree_leaves_with_path(after_state.params),
        jax.tree_util.tree_leaves(want),
        strict=True,
    ):
        # Parameters move by lr * grad ~ 1e-3; float32 gradients agree to ~1e-4 relative.
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def _resnet_params(net, x):
    """pcjax ResNet-18 parameters from the reference's names, regenerated by NumPy."""
    template = jax.eval_shape(lambda: net.init(jax.random.key(0), x, train=True))["params"]

    def torch_name(path):
        keys = [p.key for p in path]
        if keys[0] == "fc":
            return f"fc.{'weight' if keys[1] == 'kernel' else 'bias'}"
        if keys[0] == "conv1":
            return "conv1.weight"
        stage, index = keys[0].removeprefix("layer").split("_")
        conv = "downsample.0" if keys[1] == "downsample" else keys[1]
        return f"layer{stage}.{index}.{conv}.weight"

    def value(path, leaf):
        name = torch_name(path)
        if name.endswith("bias"):
            shape = leaf.shape
        elif leaf.ndim == 4:  # HWIO <- OIHW
            shape = (leaf.shape[3], leaf.shape[2], leaf.shape[0], leaf.shape[1])
        else:  # Dense [in, out] <- [out, in]
            shape = leaf.shape[::-1]
        w = golden.golden_weights(f"resnet/{name}", shape, golden.fan_in_scale(shape))
        if leaf.ndim == 4:
            w = np.transpose(w, (2, 3, 1, 0))
        elif leaf.ndim == 2:
            w = w.T
        assert w.shape == leaf.shape, (name, w.shape, leaf.shape)
        return jnp.asarray(w)

    return jax.tree_util.tree_map_with_path(value, template)


@pytest.mark.slow
@pytest.mark.parametrize("act", models.RESNET_NONLINEARITIES)
def test_resnet18_forward_matches_reference(ref, act):
    """Logits of the bias-free ResNet-18 in eval mode (initial running statistics) and in train
    mode (batch statistics), 64x64 inputs, weights regenerated from the reference's names."""
    net = models.ResNet18(num_classes=1000, nonlinearity=act)
    x = jnp.asarray(_nhwc(golden.golden_input(f"resnet/{act}", (4, 3, 64, 64))))
    params = _resnet_params(net, x)
    stats = support_variables.init(net, x, train=True, impl="rbg")["batch_stats"]
    v = {"params": params, "batch_stats": stats}
    eval_logits = net.apply(v, x, train=False)
    want = ref[f"resnet/{act}/eval_logits"]
    # 18 float32 convolutions: round-off ~1e-6 relative, summed over thousands of terms each.
    np.testing.assert_allclose(eval_logits, want, rtol=0, atol=1e-4 * np.abs(want).max())
    logits, _ = net.apply(v, x, train=True, mutable=["batch_stats"])
    want = ref[f"resnet/{act}/logits"]
    np.testing.assert_allclose(logits, want, rtol=0, atol=1e-4 * np.abs(want).max())
