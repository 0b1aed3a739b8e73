"""The authors' PyTorch code (FlorentinGuth/PhaseCollapse), imported from a local checkout.

Used to measure pcjax side by side with it (`benchmarks.reference`) and to write the
golden outputs (`tests/golden/generate_golden.py`). It is no dependency of pcjax and nothing of
it is copied here: these helpers run under a separate Python with torch, numpy and scipy,
against a checkout of 693647f with the two one-line fixes of docs/spec.md 7.1.
"""

from __future__ import annotations

import os
import sys
import types

# The command lines of the authors' `run.py` for the models pcjax benchmarks (docs/spec.md 3.8).
CIFAR_FLAGS = ["--cifar10", "--factorize-filters", "0"]
VARIANT_FLAGS = {"A": ["-a", "Fw Std Pc N", "--psi-arch", "mod"], "B": ["-a", "Fw rho Std Pc N"]}
MOD_FLAGS = ["--scat-non-linearity", "mod", "--scat-non-linearity-learned", "0"]


def wph_flags(n: int) -> list[str]:
    """`--n-blocks n` with a phase-harmonic wavelet bank in each block."""
    return ["--n-blocks", str(n), "--scattering-wph", *["1"] * n]


def _paper_flags(dataset: str, variant: str) -> list[str]:
    if dataset == "cifar10":
        widths, angles, n = "64 128 256 512 512 512 512 512", "4", 8
        data = CIFAR_FLAGS
    else:
        widths, angles, n = "32 64 64 128 256 512 512 512 512 512 256", "8", 11
        data = ["--factorize-filters", "1"]
    return [
        *data,
        *wph_flags(n),
        "--scat-angles",
        *[angles] * n,
        "--Pc-size",
        *widths.split(),
        *VARIANT_FLAGS[variant],
        *MOD_FLAGS,
    ]


# Benchmark rows (as in `benchmarks.train_step`): flags, image size, number of classes.
PAPER_MODELS = {
    "cifar_b": (_paper_flags("cifar10", "B"), 32, 10),
    "cifar_a": (_paper_flags("cifar10", "A"), 32, 10),
    "imagenet_b": (_paper_flags("imagenet", "B"), 224, 1000),
}


def _stub_modules() -> None:
    """Empty stand-ins for the data-loading and logging packages the authors' scripts import."""
    for name in [
        "torchvision",
        "torchvision.transforms",
        "torchvision.datasets",
        "torchvision.models",
        "torch.utils.tensorboard",
    ]:
        mod = types.ModuleType(name)
        mod.SummaryWriter = object
        sys.modules[name] = mod


def import_main_block(checkout: str):
    """(torch, the authors' `main_block` module) from `checkout`; a clear error if it is not one."""
    checkout = os.path.abspath(checkout)
    if not os.path.isfile(os.path.join(checkout, "main_block.py")):
        raise SystemExit(
            f"{checkout} has no main_block.py: pass a checkout of FlorentinGuth/PhaseCollapse."
        )
    sys.path.insert(0, checkout)
    _stub_modules()
    import main_block
    import torch

    return torch, main_block


def parse_flags(main_block, flags: list[str]):
    """The authors' parsed and completed arguments for `flags` (through their own `main`)."""
    captured = {}
    saved_worker, saved_argv = main_block.main_worker, sys.argv
    main_block.main_worker = lambda args: captured.setdefault("args", args)
    sys.argv = ["main_block.py", *flags]
    try:
        main_block.main()
    finally:
        main_block.main_worker, sys.argv = saved_worker, saved_argv
    return captured["args"]


def build_model(main_block, flags: list[str]):
    """The model the authors' `main_block.load_model` builds for `flags`."""
    return main_block.load_model(parse_flags(main_block, flags), None, None, None, log=False)
