"""Class-separation analysis: float64 NumPy oracles for the streaming statistics, NCM and the
batch objective; linear probe on toy sets; gradients against finite differences; feature
capture; checkpoint restore."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pcjax import analysis
from pcjax.configs import digits as digits_config
from pcjax.configs import schema
from pcjax.nn import models
from pcjax.training import checkpoint

NUM_CLASSES = 4
IMAGE_SHAPE = (8, 8, 1)


# --- Oracles --------------------------------------------------------------------------------------


def oracle_separation(x, y, num_classes):
    """Float64 two-pass class means, traces and ratios (count-weighted, Hermitian norms)."""
    x = np.asarray(x).astype(np.complex128 if np.iscomplexobj(x) else np.float64)
    x = x.reshape(len(x), -1)
    y = np.asarray(y)
    n = len(x)
    mu = x.mean(axis=0)
    means = np.zeros((num_classes, x.shape[1]), x.dtype)
    counts = np.zeros(num_classes)
    within = between = 0.0
    for k in range(num_classes):
        xk = x[y == k]
        counts[k] = len(xk)
        if len(xk) == 0:
            continue
        means[k] = xk.mean(axis=0)
        within += np.sum(np.abs(xk - means[k]) ** 2)
        between += len(xk) * np.sum(np.abs(means[k] - mu) ** 2)
    total = np.sum(np.abs(x - mu) ** 2) / n
    return dict(
        class_means=means,
        mean=mu,
        counts=counts,
        trace_within=within / n,
        trace_between=between / n,
        trace_total=total,
        fisher_ratio=within / between,
        between_within_ratio=between / within,
    )


def oracle_ncm(x, y, means, present):
    x = np.asarray(x).astype(np.complex128).reshape(len(x), -1)
    d = np.sum(np.abs(x[:, None, :] - np.asarray(means)[None].astype(np.complex128)) ** 2, -1)
    d[:, ~np.asarray(present)] = np.inf
    return np.mean(np.argmin(d, axis=1) == np.asarray(y))


def labelled_features(seed, n, dim, complex_, offset=3.0, absent=3):
    """Class-clustered random features with a common offset; class `absent` has no example."""
    rng = np.random.default_rng(seed)
    y = rng.choice([k for k in range(NUM_CLASSES) if k != absent], size=n)
    centres = rng.normal(size=(NUM_CLASSES, dim))
    noise = rng.normal(size=(n, dim))
    if complex_:
        centres = centres + 1j * rng.normal(size=(NUM_CLASSES, dim))
        noise = noise + 1j * rng.normal(size=(n, dim))
    x = offset + centres[y] + 0.7 * noise
    return x.astype(np.complex64 if complex_ else np.float32), y.astype(np.int32)


def padded_batches(x, y, batch_size):
    """Fixed-size batches; the last is padded with garbage features and labels, mask 0."""
    out = []
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        pad = batch_size - len(xb)
        mask = np.r_[np.ones(len(xb)), np.zeros(pad)].astype(np.float32)
        xb = np.concatenate([xb, np.full((pad,) + x.shape[1:], 50.0, x.dtype)])
        yb = np.concatenate([yb, np.zeros(pad, np.int32)])  # class 0: must be ignored
        out.append((xb, yb, mask))
    return out


# --- Streaming statistics -------------------------------------------------------------------------


@pytest.mark.parametrize("complex_", [False, True])
def test_streaming_stats_match_float64_oracle(complex_):
    x, y = labelled_features(0, 37, 5, complex_)
    ref = oracle_separation(x, y, NUM_CLASSES)
    dtype = jnp.complex64 if complex_ else jnp.float32
    update = jax.jit(analysis.update_stats)

    stats = analysis.init_stats(NUM_CLASSES, 5, dtype)
    for xb, yb, mb in padded_batches(x, y, 8):  # 5 batches, the last one 3 real + 5 padded
        stats = update(stats, jnp.asarray(xb), jnp.asarray(yb), jnp.asarray(mb))
    one_shot = analysis.update_stats(analysis.init_stats(NUM_CLASSES, 5, dtype), x, y)

    for s in (stats, one_shot):
        fin = jax.jit(analysis.finalize)(s)
        np.testing.assert_array_equal(fin["class_counts"], ref["counts"])
        np.testing.assert_array_equal(fin["class_present"], ref["counts"] > 0)
        # float32 sums of <= 37 terms of size ~|offset + centre|^2 ~ 25 per coordinate, after the
        # automatic shift by the first batch's mean: errors ~1e-6 relative; 1e-5 leaves margin.
        np.testing.assert_allclose(
            fin["class_means"][ref["counts"] > 0],
            ref["class_means"][ref["counts"] > 0],
            rtol=1e-5,
            atol=1e-5,
        )
        np.testing.assert_allclose(fin["mean"], ref["mean"], rtol=1e-5, atol=1e-5)
        for key in analysis.layerwise._SCALARS:
            np.testing.assert_allclose(float(fin[key]), ref[key], rtol=1e-5, err_msg=key)
        np.testing.assert_allclose(
            float(fin["trace_total"]), float(fin["trace_within"] + fin["trace_between"]), rtol=1e-5
        )


@pytest.mark.parametrize("complex_", [False, True])
def test_streaming_stats_float64_exact(complex_):
    """Under x64 the streaming formulas agree with the two-pass oracle to rounding (1e-12)."""
    x, y = labelled_features(1, 29, 6, complex_, offset=100.0)
    ref = oracle_separation(x, y, NUM_CLASSES)
    with jax.enable_x64(True):
        dtype = jnp.complex128 if complex_ else jnp.float64
        x64 = np.asarray(x, dtype)
        # A fixed zero shift: the plain Q_y - n_y ||mu_y||^2 formula, exact enough in float64.
        stats = analysis.init_stats(NUM_CLASSES, 6, dtype, shift=np.zeros(6))
        for xb, yb, mb in padded_batches(x64, y, 7):
            stats = analysis.update_stats(stats, xb, yb, mb)
        fin = analysis.finalize(stats)
        for key in analysis.layerwise._SCALARS:
            np.testing.assert_allclose(float(fin[key]), ref[key], rtol=1e-9, err_msg=key)
        np.testing.assert_allclose(fin["class_means"][:3], ref["class_means"][:3], rtol=1e-12)


def test_auto_shift_avoids_cancellation():
    """Large common offset: the shifted sums keep tr(Sigma_W) to float32 accuracy."""
    x, y = labelled_features(2, 64, 8, complex_=True, offset=300.0)
    ref = oracle_separation(x, y, NUM_CLASSES)
    errors = {}
    for name, shift in (("auto", None), ("zero", np.zeros(8))):
        stats = analysis.init_stats(NUM_CLASSES, 8, jnp.complex64, shift=shift)
        assert stats.auto_shift == (shift is None)
        for xb, yb, mb in padded_batches(x, y, 8):
            stats = analysis.update_stats(stats, xb, yb, mb)
        within = float(analysis.finalize(stats)["trace_within"])
        errors[name] = abs(within / ref["trace_within"] - 1)
    # ||u||^2 ~ 1.4e6 per example against ~8 within-class: the unshifted Q_y - n_y ||mu_y||^2
    # loses ~1e-3 (measured 2.4e-3), the shifted one stays at float32 rounding (~1e-7).
    assert errors["auto"] < 1e-5 and errors["auto"] < errors["zero"], errors


def test_stats_reject_complex_features_in_real_accumulator():
    stats = analysis.init_stats(2, 3, jnp.float32)
    with pytest.raises(ValueError, match="complex accumulator"):
        analysis.update_stats(stats, jnp.ones((2, 3), jnp.complex64), jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match="dimension"):
        analysis.update_stats(stats, jnp.ones((2, 4)), jnp.zeros(2, jnp.int32))


@pytest.mark.parametrize("complex_", [False, True])
def test_batch_separation_matches_oracle(complex_):
    x, y = labelled_features(3, 23, 4, complex_)
    mask = (np.arange(23) % 5 != 0).astype(np.float32)
    ref = oracle_separation(x[mask > 0], y[mask > 0], NUM_CLASSES)
    out = jax.jit(analysis.batch_separation, static_argnums=2)(x, y, NUM_CLASSES, mask)
    for key in ("trace_within", "trace_between", "fisher_ratio", "between_within_ratio"):
        np.testing.assert_allclose(float(out[key]), ref[key], rtol=1e-5, err_msg=key)


# --- Nearest class mean ---------------------------------------------------------------------------


@pytest.mark.parametrize("complex_", [False, True])
def test_ncm_streaming_matches_oracle(complex_):
    x_tr, y_tr = labelled_features(4, 40, 6, complex_)
    x_te, y_te = labelled_features(5, 31, 6, complex_)
    # Overlapping classes so that the accuracy is neither 0 nor 1.
    x_te = x_te + 1.5 * np.random.default_rng(6).normal(size=x_te.shape).astype(x_te.dtype)
    dtype = jnp.complex64 if complex_ else jnp.float32
    fin = analysis.finalize(
        analysis.update_stats(analysis.init_stats(NUM_CLASSES, 6, dtype), x_tr, y_tr)
    )
    ref_means = oracle_separation(x_tr, y_tr, NUM_CLASSES)["class_means"]
    present = np.asarray(fin["class_present"])
    assert not present[3]  # class 3 absent from the fitting set: never predicted
    expected = oracle_ncm(x_te, y_te, ref_means, present)
    assert 0.2 < expected < 1.0

    update = jax.jit(analysis.update_ncm_stats)
    ncm = analysis.init_ncm_stats()
    for xb, yb, mb in padded_batches(x_te, y_te, 8):
        ncm = update(ncm, xb, yb, fin["class_means"], mb, fin["class_present"])
    assert float(ncm.total) == 31
    np.testing.assert_allclose(float(analysis.ncm_accuracy(ncm)), expected, rtol=0, atol=1e-7)
    pred = analysis.ncm_predict(x_te, fin["class_means"], fin["class_present"])
    assert not np.any(np.asarray(pred) == 3)


# --- Linear probe ---------------------------------------------------------------------------------


def test_count_sketch_is_a_fixed_linear_map():
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(3, 50)).astype(np.float32), rng.normal(size=(3, 50)).astype(np.float32)
    s = lambda v: np.asarray(analysis.count_sketch(jnp.asarray(v), 8, seed=1))  # noqa: E731
    np.testing.assert_allclose(s(2 * a - b), 2 * s(a) - s(b), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(s(a[:1]), s(a)[:1])  # same hash whatever the batch
    assert analysis.count_sketch(jnp.asarray(a), 64).shape == (3, 50)  # under the cap: identity
    np.testing.assert_allclose(np.linalg.norm(s(a)) ** 2 / np.linalg.norm(a) ** 2, 1.0, atol=0.7)
    z = analysis.probe_features(jnp.asarray(a + 1j * b), max_dim=None)
    np.testing.assert_array_equal(z, np.concatenate([a, b], axis=1))


def test_linear_probe_separable_and_random_labels():
    rng = np.random.default_rng(8)
    k, dim = 3, 300  # complex: 600 real dims, sketched to 256
    centres = 2.0 * (rng.normal(size=(k, dim)) + 1j * rng.normal(size=(k, dim)))

    def sample(n):
        y = rng.integers(0, k, n)
        noise = rng.normal(size=(n, dim)) + 1j * rng.normal(size=(n, dim))
        return (centres[y] + noise).astype(np.complex64), y

    (x_tr, y_tr), (x_te, y_te) = sample(150), sample(150)
    acc = analysis.linear_probe_accuracy(x_tr, y_tr, x_te, y_te, k, steps=50, max_dim=256)
    assert acc["train_accuracy"] == 1.0 and acc["test_accuracy"] >= 0.98

    # Random labels on pure noise: the probe can fit the train set, not generalise. Chance is
    # 1/3; with 300 test examples the standard deviation is 0.027, so +-0.12 is > 4 sigma.
    # (Same train shape as above, so the jitted fit is reused.)
    x_tr = rng.normal(size=(150, 256)).astype(np.float32)
    x_te = rng.normal(size=(300, 256)).astype(np.float32)
    y_tr, y_te = rng.integers(0, k, 150), rng.integers(0, k, 300)
    acc = analysis.linear_probe_accuracy(x_tr, y_tr, x_te, y_te, k, steps=50)
    assert abs(acc["test_accuracy"] - 1 / 3) < 0.12
    assert acc["train_accuracy"] > 0.5


# --- Networks: capture, whole-dataset analysis, gradients ---------------------------------------


def _digits_net(widths):
    """The quick-start network at `widths`, for NUM_CLASSES classes."""
    cfg = digits_config.get_config()
    cfg.model.widths = widths
    return schema.build_model(cfg).clone(num_classes=NUM_CLASSES)


@pytest.fixture(scope="module")
def tiny_net():
    model = _digits_net((4, 6))
    variables = jax.jit(lambda key: model.init(key, jnp.zeros((1,) + IMAGE_SHAPE), train=False))(
        jax.random.key(0)
    )
    # Non-trivial running statistics, so that eval mode is not the identity standardisation.
    variables = dict(variables)
    variables["batch_stats"] = jax.tree.map(
        lambda a: a + 0.1 * jax.random.uniform(jax.random.key(1), a.shape), variables["batch_stats"]
    )
    rng = np.random.default_rng(9)
    labels = np.arange(14, dtype=np.int32) % 3  # class 3 never occurs
    patterns = rng.normal(size=(3,) + IMAGE_SHAPE)
    images = (patterns[labels] + rng.normal(size=(14,) + IMAGE_SHAPE)).astype(np.float32)
    return model, variables, images, labels


def test_capture_returns_every_block(tiny_net):
    model, variables, images, _ = tiny_net
    capture = jax.jit(analysis.capture_block_outputs, static_argnums=(0, 3))
    out = capture(model, variables, images[:3])
    names = []  # Python-side order (jit outputs come back with sorted dict keys)
    jax.eval_shape(
        lambda v, x: names.extend(analysis.capture_block_outputs(model, v, x)) or 0,
        variables,
        images[:3],
    )
    assert names == ["input", "block0", "block1"] and sorted(out) == sorted(names)
    assert out["block0"].shape == (3, 8, 8, 4) and out["block0"].dtype == jnp.complex64
    assert out["block1"].shape == (3, 4, 4, 6) and out["block1"].dtype == jnp.complex64
    np.testing.assert_array_equal(out["input"], images[:3])
    np.testing.assert_allclose(jnp.sum(jnp.abs(out["block1"]) ** 2, -1), 1.0, rtol=1e-5)
    # Same values as a plain apply (eval mode).
    _, state = jax.jit(
        lambda v, x: model.apply(
            v, x, train=False, capture_intermediates=True, mutable=["intermediates"]
        )
    )(variables, images[:3])
    np.testing.assert_allclose(
        out["block1"], state["intermediates"]["block1"]["__call__"][0], atol=1e-6
    )

    feats = analysis.make_feature_fn(model, variables)(images[:3])
    assert {k: v.shape for k, v in feats.items()} == {
        "input": (3, 64),
        "block0": (3, 256),
        "block1": (3, 96),
    }
    # jit vs op-by-op: float32 rounding differences only.
    np.testing.assert_allclose(feats["block1"], out["block1"].reshape(3, -1), atol=1e-6)
    pooled = analysis.make_feature_fn(model, variables, ["block1"], pooling="mean")(images[:3])
    np.testing.assert_allclose(pooled["block1"], out["block1"].mean(axis=(1, 2)), rtol=1e-6)

    nested = capture(model, variables, images[:2], ("head", "block0/proj"))
    assert sorted(nested) == ["block0/proj", "head"]
    assert nested["head"].shape == (2, NUM_CLASSES) and nested["block0/proj"].shape == (2, 8, 8, 4)
    with pytest.raises(KeyError, match="block7"):
        jax.eval_shape(
            lambda v, x: analysis.capture_block_outputs(model, v, x, ["block7"]),
            variables,
            images[:2],
        )


def test_capture_resnet_layers():
    model = models.ResNet18(num_classes=3, widths=(2, 2, 2, 2))
    x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape)))
    out = jax.eval_shape(lambda v, im: analysis.capture_block_outputs(model, v, im), variables, x)
    names = [f"layer{s}_{i}" for s in range(1, 5) for i in range(2)]
    assert sorted(out) == sorted(["input"] + names)
    assert out["layer1_1"].shape == (2, 4, 4, 2) and out["layer4_1"].shape == (2, 1, 1, 2)


def test_layerwise_separation_matches_oracles(tiny_net):
    model, variables, images, labels = tiny_net
    feats = analysis.make_feature_fn(model, variables)(images)
    train = padded_batches(images, labels, 4)  # 4 batches, the last with 2 padded examples
    test_images = images[::-1] + 0.5
    test = padded_batches(test_images, labels[::-1].copy(), 5)
    test_feats = analysis.make_feature_fn(model, variables)(test_images)

    res = analysis.layerwise_separation(
        model,
        variables,
        lambda: ({"image": i, "label": lb, "mask": m} for i, lb, m in train),
        NUM_CLASSES,
        eval_batches=test,
        options=analysis.LayerwiseOptions(linear_probe=True, probe_steps=10),
    )
    assert list(res) == ["input", "block0", "block1"]
    for layer, r in res.items():
        ref = oracle_separation(feats[layer], labels, NUM_CLASSES)
        ref_eval = oracle_separation(test_feats[layer], labels[::-1], NUM_CLASSES)
        assert r["dim"] == feats[layer].shape[1]
        for key in analysis.layerwise._SCALARS:
            # float32 network features, float32 sums of <= 14 terms: 1e-4 relative.
            np.testing.assert_allclose(r[f"train/{key}"], ref[key], rtol=1e-4, err_msg=layer)
            np.testing.assert_allclose(r[f"eval/{key}"], ref_eval[key], rtol=1e-4, err_msg=layer)
        present = ref["counts"] > 0
        # Counts are exact; the ratio is a float32 division.
        assert r["train/ncm_accuracy"] == pytest.approx(
            oracle_ncm(feats[layer], labels, ref["class_means"], present), abs=1e-6
        )
        assert r["eval/ncm_accuracy"] == pytest.approx(
            oracle_ncm(test_feats[layer], labels[::-1], ref["class_means"], present), abs=1e-6
        )
        assert 0.0 <= r["eval/probe_accuracy"] <= 1.0 and r["train/probe_accuracy"] == 1.0

    with pytest.raises(ValueError, match="one-shot iterator"):
        analysis.layerwise_separation(model, variables, iter(train), NUM_CLASSES)


@pytest.mark.slow
def test_layerwise_neural_collapse_and_no_recompile(tiny_net):
    """NC measures per layer equal the library's finalize on the same sums; a second call on
    the same network and batch shape reuses the compiled step (no new trace)."""
    from pcjax.analysis import layerwise
    from pcjax.analysis import neural_collapse as nc

    model, variables, images, labels = tiny_net
    train = padded_batches(images, labels, 4)
    batches = lambda: ({"image": i, "label": lb, "mask": m} for i, lb, m in train)  # noqa: E731
    feats, logits = analysis.capture_with_output(model, variables, images, [nc.CLASSIFIER_LAYER])
    clf = nc.phase_collapse_classifier(variables, feats[nc.CLASSIFIER_LAYER].shape[1:])
    kwargs = dict(classifier=(nc.CLASSIFIER_LAYER, clf), eval_batches=train)
    res = analysis.layerwise_separation(model, variables, batches, NUM_CLASSES, **kwargs)
    assert list(res) == ["input", "block0", "block1", nc.CLASSIFIER_LAYER]
    traces = layerwise.TRACES["layerwise_step"]
    again = analysis.layerwise_separation(model, variables, batches, NUM_CLASSES, **kwargs)
    assert layerwise.TRACES["layerwise_step"] == traces and again == res
    # Independent check of the per-layer values: NumPy float64 on the captured features
    # (3 of the 4 classes present, as in the fixture).
    all_feats = analysis.make_feature_fn(model, variables, list(res))(images)
    pred = np.asarray(jnp.argmax(logits, -1))
    for layer, r in res.items():
        h = np.asarray(all_feats[layer])
        h = (np.concatenate([h.real, h.imag], 1) if np.iscomplexobj(h) else h).astype(np.float64)
        mus = np.stack([h[labels == c].mean(0) for c in range(3)])
        resid = h - mus[labels]
        centred = mus - mus.mean(0)
        sigma_b = centred.T @ centred / 3
        pinv = np.linalg.pinv(sigma_b, rcond=1e-10, hermitian=True)
        nc1 = np.trace(resid.T @ resid / len(labels) @ pinv)
        np.testing.assert_allclose(r["train/nc1"], nc1 / 3, rtol=2e-3, err_msg=layer)
        norms = np.linalg.norm(centred, axis=1)
        np.testing.assert_allclose(r["train/nc2_equinorm"], norms.std() / norms.mean(), rtol=1e-4)
        nearest = ((h[:, None] - mus[None]) ** 2).sum(-1).argmin(1)
        assert r["train/nc4"] == pytest.approx(np.mean(nearest == pred), abs=1e-6)
        assert r["eval/nc4"] == pytest.approx(r["train/nc4"], abs=1e-6)  # same data
    assert "train/nc3" in res[nc.CLASSIFIER_LAYER] and "train/nc3" not in res["block1"]


def test_capture_in_train_mode_uses_batch_statistics(tiny_net):
    model, variables, images, _ = tiny_net
    evaluated = analysis.capture_block_outputs(model, variables, images[:6])
    trained = analysis.capture_block_outputs(model, variables, images[:6], train=True)
    assert np.abs(np.asarray(evaluated["block1"] - trained["block1"])).max() > 1e-3
    # Training mode: the head's BatchNorm (scale 1, offset 0 at init) standardises with the
    # batch's own statistics: zero mean, unit variance per channel over the batch.
    for mode, close in ((True, True), (False, False)):
        out = analysis.capture_block_outputs(model, variables, images[:6], ["head/bn"], mode)
        u = np.asarray(out["head/bn"], np.float64)
        assert np.allclose(u.mean(axis=(0, 1, 2)), 0, atol=1e-4) is close
        assert np.allclose(u.var(axis=(0, 1, 2)), 1, atol=1e-3) is close


def test_separation_gradient_float64_features():
    """d ratio / d features against central differences, in float64 (complex features)."""
    x, y = labelled_features(10, 12, 3, complex_=True)
    with jax.enable_x64(True):
        x = jnp.asarray(x, jnp.complex128)
        f = jax.jit(lambda v: analysis.batch_separation(v, y, NUM_CLASSES)["between_within_ratio"])
        g = jax.jit(jax.grad(f))(x)
        d = jax.random.normal(jax.random.key(2), x.shape, jnp.complex128)
        # JAX's gradient of a real f wrt complex z is g = df/dRe z - i df/dIm z (the conjugate of
        # PyTorch's, docs/spec.md 7.4), so the derivative along d is Re g Re d - Im g Im d.
        analytic = float(jnp.sum(g.real * d.real - g.imag * d.imag))
        h = 1e-5
        fd = (float(f(x + h * d)) - float(f(x - h * d))) / (2 * h)
        np.testing.assert_allclose(analytic, fd, rtol=1e-7)


def test_separation_gradients_finite_differences(tiny_net):
    model, variables, images, labels = tiny_net
    images, labels = images[:9].copy(), labels[:9]
    images[4] = 0.0  # an all-zero image: exactly zero features at every block
    g2_images, g2_params = analysis.separation_gradients(
        model, variables, images, labels, "block1", NUM_CLASSES
    )
    fn = analysis.make_separation_grad_fn(model, "block1", NUM_CLASSES)  # cached: no recompile
    value, g_images, g_params = fn(variables, images, labels)
    np.testing.assert_array_equal(g2_images, g_images)
    assert jax.tree.structure(g2_params) == jax.tree.structure(variables["params"])
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves((g_images, g_params)))
    # Layers after the probed one do not move its features.
    assert all(float(jnp.max(jnp.abs(g))) == 0 for g in jax.tree.leaves(g_params["head"]))
    assert float(jnp.max(jnp.abs(g_params["block1"]["proj"]["kernel"]))) > 0
    objective = jax.jit(
        lambda p, im: analysis.separation_objective(
            model, {**variables, "params": p}, im, labels, "block1", NUM_CLASSES
        )
    )
    params = variables["params"]
    np.testing.assert_allclose(float(objective(params, images)), float(value), rtol=1e-6)
    kernel = params["block0"]["proj"]["kernel"]
    unit = lambda a: np.asarray(a) / np.linalg.norm(np.asarray(a))  # noqa: E731
    # Directions: gradient plus a random part, so the derivative is large (a meaningful check)
    # and still involves every coordinate of the gradient.
    d_img = np.asarray(unit(g_images) + unit(jax.random.normal(jax.random.key(3), images.shape)))
    # Keep the zero image at zero: N (pixel normalisation) jumps from 0 to unit norm there, so a
    # finite difference across it measures that jump, not a derivative.
    d_img[4] = 0.0
    d_img = unit(d_img)
    g_ker = g_params["block0"]["proj"]["kernel"]
    d_ker = unit(unit(g_ker) + unit(jax.random.normal(jax.random.key(4), kernel.shape)))

    def with_kernel(k):
        return {**params, "block0": {**params["block0"], "proj": {"kernel": k}}}

    # float32 central differences with h = 0.03: rounding of f (|f| ~ 0.5, ~1e-6 relative)
    # gives ~1e-6 / (2h) ~ 2e-5 absolute error; truncation O(h^2) was measured at ~1e-4
    # relative. The derivatives are ~1e-2 or larger: 1e-2 relative + 5e-5 absolute.
    h = 0.03
    cases = [
        (
            float(np.sum(np.asarray(g_images) * d_img)),
            lambda s: objective(params, images + s * h * d_img),
        ),
        (
            float(np.sum(np.asarray(g_ker) * d_ker)),
            lambda s: objective(with_kernel(kernel + s * h * d_ker), images),
        ),
    ]
    for analytic, f in cases:
        assert analytic > 1e-3  # the check is not vacuous
        fd = (float(f(1.0)) - float(f(-1.0))) / (2 * h)
        assert abs(fd - analytic) <= 1e-2 * abs(analytic) + 5e-5, (fd, analytic)


# --- Checkpoints ----------------------------------------------------------------------------------


@flax.struct.dataclass
class _State:
    """Mirror of the trainer's state pytree."""

    step: jax.Array
    params: dict
    batch_stats: dict
    opt_state: optax.OptState


@pytest.mark.parametrize("as_dataclass", [False, True])
def test_load_variables_from_workdir(tiny_net, tmp_path, as_dataclass):
    model, variables, _, _ = tiny_net
    tx = optax.sgd(0.1, momentum=0.9)
    mngr = checkpoint.create_manager(tmp_path, every_steps=1, max_to_keep=3)  # the trainer's
    saved = {}
    for step, delta in ((1, 0.5), (2, 1.0)):
        params = jax.tree.map(lambda a, d=delta: a + d, variables["params"])
        stats = jax.tree.map(lambda a, d=delta: a * (1 + d), variables["batch_stats"])
        fields = dict(
            step=jnp.asarray(step), params=params, batch_stats=stats, opt_state=tx.init(params)
        )
        state = _State(**fields) if as_dataclass else fields
        assert checkpoint.save(mngr, step, state, loop={"epoch": 0})
        saved[step] = {"params": params, "batch_stats": stats}
    mngr.wait_until_finished()
    mngr.close()

    for step in (None, 1):
        out = analysis.load_variables_from_workdir(tmp_path, model, IMAGE_SHAPE, step=step)
        want = saved[step or 2]
        assert jax.tree.structure(out) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(a, b)
            assert a.dtype == b.dtype
        jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1,) + IMAGE_SHAPE)), out)  # usable

    other = _digits_net((4, 8))
    with pytest.raises(ValueError, match="shape"):
        analysis.load_variables_from_workdir(tmp_path, other, IMAGE_SHAPE)
    with pytest.raises(FileNotFoundError):
        analysis.load_variables_from_workdir(tmp_path / "nowhere", model, IMAGE_SHAPE)
