"""Forward error of the authors' float32 PyTorch code with pcjax's weights and inputs.

    python -m benchmarks.accuracy --seed 1 --same-weights /tmp/w1.npz --precision highest
    TORCH_PYTHON benchmarks/reference_accuracy.py /path/to/PhaseCollapse /tmp/w1.npz

Runs under a Python with torch (see `benchmarks/authors_code.py`). Builds the CIFAR-10
variant-B model with the authors' `main_block` from their `run.py` flags, sets every block's
projection to the kernel in the `.npz`, runs the image batch in train mode (batch statistics)
and prints, per block, max |reference - float64| / max |float64| against the float64 outputs
that `benchmarks/accuracy.py` computed for pcjax: the same figure, on the same weights.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from authors_code import PAPER_MODELS, build_model, import_main_block  # noqa: E402


def chained_errors(checkout: str, path: str) -> list[float]:
    torch, main_block = import_main_block(checkout)
    data = np.load(path)
    model = build_model(main_block, PAPER_MODELS["cifar_b"][0])
    modules = list(model.module)
    to_split, blocks = modules[0], modules[1:-2]  # ToSplitTensor, blocks (then ToTensor, head)
    with torch.no_grad():
        for b, block in enumerate(blocks):
            ((_, weight),) = [(n, p) for n, p in block.named_parameters() if n.endswith("param")]
            kernel = data[f"kernel{b}"]  # pcjax [c_in, c_out, 2] -> theirs [c_out, c_in, 1, 1, 2]
            weight.copy_(
                torch.from_numpy(np.ascontiguousarray(kernel.transpose(1, 0, 2)[:, :, None, None]))
            )
    model.train()
    x = torch.from_numpy(np.ascontiguousarray(data["x"].transpose(0, 3, 1, 2)))
    errors = []
    with torch.no_grad():
        u = to_split(x)
        for b, block in enumerate(blocks):
            u = block(u)
            got = u.full_view().numpy().transpose(0, 2, 3, 1).astype(np.complex128)
            want = data[f"want{b}"]
            errors.append(float(np.abs(got - want).max() / np.abs(want).max()))
    return errors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkout", help="checkout of FlorentinGuth/PhaseCollapse")
    p.add_argument("weights", help=".npz written by benchmarks/accuracy.py --same-weights")
    args = p.parse_args()
    print("| block | reference, chained (block out) |")
    print("|---|---|")
    for b, e in enumerate(chained_errors(args.checkout, args.weights)):
        print(f"| {b} | {e:.2e} |")


if __name__ == "__main__":
    main()
