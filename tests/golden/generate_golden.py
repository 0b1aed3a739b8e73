"""Writes tests/golden/reference_outputs.npz from the authors' PyTorch code (not part of pcjax).

    python tests/golden/generate_golden.py /path/to/PhaseCollapse [--out tests/golden/...npz]

Needs a checkout of FlorentinGuth/PhaseCollapse at 693647f with the two one-line fixes of
docs/spec.md 7.1 applied (`handle_param` keeps None; "tanh" among the argparse choices), and a
separate environment with torch (2.13.0 CPU was used), numpy and scipy. The authors' code is
imported from that checkout and never copied here. torchvision and tensorboard, imported by
their scripts for data loading and logging only, are replaced by empty modules.

Every model is built by the authors' own `main_block.load_model` from the command-line flags of
their `run.py` (tiny widths). Their parameters are *overwritten* with values drawn by
`golden_weights` (a NumPy function of the parameter's name and shape, re-run by the tests), so
the .npz holds only inputs and outputs, and the tests load the same weights into pcjax.

Contents (arrays keyed "<case>/<what>"):
* block/<cifar|...>/<A|B>/<rho>: one CIFAR-10 block (32x32 input, train-mode statistics),
  variants A and B, rho in mod, cst, ms, tanh.
* imagenet/<standard|odd>: ImageNet block 0 (standard bank, 224 -> 112) and the odd factorised
  bank (block 2 of a 3-block net, 112 -> 56), outputs sampled every 4th pixel.
* sgd/...: one SGD step (lr 0.01, momentum 0.9, weight decay 1e-4) of a 4-block CIFAR variant-B
  net: loss, logits, and every parameter after the step.
* resnet/<act>: bias-free ResNet-18 logits (eval and train-mode BN) for each Table-3
  activation, 64x64 inputs.
"""

from __future__ import annotations

import argparse
import os
import sys
import zlib

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
from authors_code import (  # noqa: E402
    CIFAR_FLAGS,
    MOD_FLAGS,
    VARIANT_FLAGS,
    build_model,
    import_main_block,
    wph_flags,
)


def golden_weights(name: str, shape: tuple[int, ...], scale: float) -> np.ndarray:
    """float32 N(0, scale^2) values seeded by the CRC-32 of `name` (shared with the tests)."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def golden_input(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Images with a non-zero mean, seeded by `name`."""
    return golden_weights("input/" + name, shape, 1.0) + np.float32(0.3)


def fan_in_scale(shape: tuple[int, ...]) -> float:
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return 1.0 / np.sqrt(max(fan_in, 1))


def _overwrite_parameters(torch, model, prefix: str, out: dict, keep_head: bool) -> None:
    """Sets every parameter to `golden_weights(prefix + name)` (the non-linearity's gains and
    thresholds: their paper initial value plus 0.05 N(0, 1)) and records it as
    out[prefix + "params/" + name]; the classifier head's only if `keep_head` (the block cases
    compare block outputs, not logits)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            shape = tuple(p.shape)
            if name.endswith(("gain", "bias")) and p.ndim == 3:  # rho's (C, 1, 1) parameters
                base = float(p.detach().reshape(-1)[0])
                w = base + 0.05 * golden_weights(prefix + name, shape, 1.0)
            else:
                w = golden_weights(prefix + name, shape, fan_in_scale(shape))
            p.copy_(torch.from_numpy(w))
            if keep_head or not name.startswith(f"module.{len(list(model.module)) - 1}."):
                out[prefix + "params/" + name] = w


RHO_FLAGS = {
    "mod": MOD_FLAGS,
    "cst": [
        "--scat-non-linearity",
        "cst",
        "--scat-non-linearity-learned",
        "1",
        "--scat-non-linearity-bias",
        "0.1",
    ],
    "ms": [
        "--scat-non-linearity",
        "ms",
        "--scat-non-linearity-learned",
        "1",
        "--scat-non-linearity-gain",
        "1.0",
        "--scat-non-linearity-bias",
        "0.0",
    ],
    "tanh": ["--scat-non-linearity", "tanh", "--scat-non-linearity-learned", "1"],
}


def _blocks_of(model):
    """The per-block modules of a model built by `load_model`."""
    layers = list(model.module)
    return layers[0], layers[1:-2], layers[-2]  # ToSplitTensor, blocks, ToTensor


def _run_blocks(torch, model, x):
    """Outputs (complex numpy, NCHW) after each block, train mode."""
    to_split, blocks, _ = _blocks_of(model)
    u = to_split(x)
    outs = []
    for blk in blocks:
        u = blk(u)
        outs.append(u.full_view().detach().numpy())
    return outs


def generate(ref_dir: str) -> dict[str, np.ndarray]:
    torch, main_block = import_main_block(ref_dir)

    torch.set_num_threads(2)

    out: dict[str, np.ndarray] = {}

    # One CIFAR block, both variants, four non-linearities.
    for variant, vflags in VARIANT_FLAGS.items():
        for rho, rflags in RHO_FLAGS.items():
            flags = [
                *CIFAR_FLAGS,
                *wph_flags(1),
                "--scat-angles",
                "4",
                "--Pc-size",
                "6",
                *vflags,
                *rflags,
            ]
            model = build_model(main_block, flags)
            key = f"block/{variant}/{rho}"
            _overwrite_parameters(torch, model, key + "/", out, keep_head=False)
            x = golden_input(key, (2, 3, 32, 32))
            model.train()
            (y,) = _run_blocks(torch, model, torch.from_numpy(x))
            out[key + "/y"] = y.astype(np.complex64)

    # ImageNet: standard bank (block 0) and odd factorised bank (block 2), variant B.
    flags = [
        *"--factorize-filters 1 --scat-angles 8 --Pc-size 4 4 4".split(),
        *wph_flags(3),
        *VARIANT_FLAGS["B"],
        *RHO_FLAGS["mod"],
    ]
    model = build_model(main_block, flags)
    _overwrite_parameters(torch, model, "imagenet/", out, keep_head=False)
    x = golden_input("imagenet", (1, 3, 224, 224))
    model.train()
    outs = _run_blocks(torch, model, torch.from_numpy(x))
    out["imagenet/standard/y"] = outs[0][..., ::4, ::4].astype(np.complex64)
    out["imagenet/odd/y"] = outs[2][..., ::4, ::4].astype(np.complex64)

    # One SGD step of a 4-block CIFAR variant-B net (the authors' loss and optimizer settings).
    flags = [
        *CIFAR_FLAGS,
        *wph_flags(4),
        *"--scat-angles 4 4 4 4 --Pc-size 4 6 6 8".split(),
        *VARIANT_FLAGS["B"],
        *RHO_FLAGS["mod"],
    ]
    model = build_model(main_block, flags)
    _overwrite_parameters(torch, model, "sgd/", out, keep_head=True)
    x = golden_input("sgd", (4, 3, 32, 32))
    labels = np.array([1, 7, 3, 1])
    model.train()
    opt = torch.optim.SGD(model.parameters(), 0.01, momentum=0.9, weight_decay=1e-4)
    logits = model(torch.from_numpy(x))
    loss = torch.nn.CrossEntropyLoss()(logits, torch.from_numpy(labels))
    opt.zero_grad()
    loss.backward()
    opt.step()
    out["sgd/labels"] = labels
    out["sgd/logits"] = logits.detach().numpy()
    out["sgd/loss"] = np.float32(loss.item())
    for name, p in model.named_parameters():
        out[f"sgd/after/{name}"] = p.detach().numpy().copy()

    # Bias-free ResNet-18, each Table-3 activation, small input.
    import models.resnet
    import standard_arch

    for act in ["relu", "abs", "thresh", "tanh", "powfixed"]:
        init_bias = 1.0 if act == "thresh" else 0.0
        net = models.resnet.resnet18(
            non_linearity=standard_arch.NonLin,
            non_linearity_name=act,
            bias=False,
            init_bias=init_bias,
        )
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name.endswith(("gain", "bias")) and "fc" not in name:
                    continue  # NonLin's fixed gain/bias keep their initial values
                p.copy_(
                    torch.from_numpy(
                        golden_weights(f"resnet/{name}", tuple(p.shape), fan_in_scale(p.shape))
                    )
                )
        # 64x64, batch 4: the last stage's batch statistics see 16 values per channel (with
        # fewer they amplify round-off too much for a float32 comparison).
        x = torch.from_numpy(golden_input(f"resnet/{act}", (4, 3, 64, 64)))
        net.eval()  # initial running statistics: BN is x / sqrt(1 + eps)
        out[f"resnet/{act}/eval_logits"] = net(x).detach().numpy()
        net.train()
        out[f"resnet/{act}/logits"] = net(x).detach().numpy()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("reference_dir", help="checkout of the authors' PhaseCollapse repository")
    p.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "reference_outputs.npz")
    )
    args = p.parse_args()
    arrays = generate(os.path.abspath(args.reference_dir))
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {len(arrays)} arrays, {os.path.getsize(args.out) / 1e6:.2f} MB to {args.out}")


if __name__ == "__main__":
    main()
