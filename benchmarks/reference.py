"""The authors' PyTorch code (`benchmarks.authors_code`) measured as pcjax is; one JSON line.

    TORCH_PYTHON -m benchmarks.reference step CHECKOUT --row cifar_b --batch 128
    TORCH_PYTHON -m benchmarks.reference error CHECKOUT W.npz

Run from the repository root by a Python with torch and scipy, in a subprocess of
`benchmarks.train_step --reference` (`step`) or `benchmarks.accuracy --reference` (`error`),
so that both codes are measured in the same run on the same machine.

`step`: the model their `main_block` builds from their `run.py` flags (`PAPER_MODELS`), random
data, the eval forward pass under `no_grad`, then a train step as their training loop runs it
(cross-entropy, backward, SGD with momentum 0.9 and weight decay 1e-4), median of the timed
steps. Eval runs first: where the train step does not fit (`--memory-limit-gib`, an
address-space limit, so that torch fails with an error instead of being killed), the eval
figure is still reported.

`error`: the CIFAR-10 variant-B model with every block's projection set to the kernels of the
`.npz` that `benchmarks.accuracy --same-weights` wrote, run on its images in train mode; per
block, max |reference - float64| / max |float64| against its float64 outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource

import numpy as np

from benchmarks import common
from benchmarks.authors_code import PAPER_MODELS, build_model, import_main_block


def step(checkout: str, row: str, batch: int, steps: int, warmup: int) -> dict:
    torch, main_block = import_main_block(checkout)
    torch.set_num_threads(os.cpu_count())
    flags, size, num_classes = PAPER_MODELS[row]
    torch.manual_seed(0)
    model = build_model(main_block, flags)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, num_classes, (batch,))

    def ips(fn, warmup: int, runs: int) -> float:
        t = common.time_fn(fn, warmup=warmup, min_time=0, min_runs=runs, max_runs=runs, sync=id)
        return batch / (t.median_ms / 1e3)

    def eval_step():
        with torch.no_grad():
            model(x)

    model.eval()
    result = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    result["eval_ips"] = ips(eval_step, 1, max(steps, 3))
    model.train()
    opt = torch.optim.SGD(model.parameters(), 0.01, momentum=0.9, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()

    def train_step():
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    try:
        result["train_ips"] = ips(train_step, warmup, steps)
    except (RuntimeError, MemoryError) as e:  # torch's allocator raises RuntimeError
        if "alloc" not in str(e).lower() and not isinstance(e, MemoryError):
            raise
        result["train_ips"] = None
    return result


def error(checkout: str, path: str) -> list[float]:
    torch, main_block = import_main_block(checkout)
    data = np.load(path)
    model = build_model(main_block, PAPER_MODELS["cifar_b"][0])
    modules = list(model.module)
    to_split, blocks = modules[0], modules[1:-2]  # ToSplitTensor, blocks (then ToTensor, head)
    with torch.no_grad():
        for b, block in enumerate(blocks):
            ((_, weight),) = [(n, p) for n, p in block.named_parameters() if n.endswith("param")]
            kernel = data[f"kernel{b}"]  # pcjax [c_in, c_out, 2] -> theirs [c_out, c_in, 1, 1, 2]
            kernel = np.ascontiguousarray(kernel.transpose(1, 0, 2)[:, :, None, None])
            weight.copy_(torch.from_numpy(kernel))
    model.train()
    u = torch.from_numpy(np.ascontiguousarray(data["x"].transpose(0, 3, 1, 2)))
    errors = []
    with torch.no_grad():
        u = to_split(u)
        for b, block in enumerate(blocks):
            u = block(u)
            got = u.full_view().numpy().transpose(0, 2, 3, 1).astype(np.complex128)
            want = data[f"want{b}"]
            errors.append(float(np.abs(got - want).max() / np.abs(want).max()))
    return errors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("step", help="train and eval images/s of one benchmark row")
    s.add_argument("checkout", help="checkout of FlorentinGuth/PhaseCollapse")
    s.add_argument("--row", required=True, choices=list(PAPER_MODELS))
    s.add_argument("--batch", type=int, required=True)
    s.add_argument("--steps", type=int, default=3)
    s.add_argument("--warmup", type=int, default=3)
    s.add_argument("--memory-limit-gib", type=float, default=0, help="0: no limit")
    e = sub.add_parser("error", help="forward error per block on pcjax's weights and inputs")
    e.add_argument("checkout", help="checkout of FlorentinGuth/PhaseCollapse")
    e.add_argument("weights", help=".npz written by benchmarks.accuracy --same-weights")
    args = p.parse_args()
    if args.what == "error":
        print(json.dumps({"errors": error(args.checkout, args.weights)}))
        return
    if args.memory_limit_gib > 0:
        limit = int(args.memory_limit_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    print(json.dumps(step(args.checkout, args.row, args.batch, args.steps, args.warmup)))


if __name__ == "__main__":
    main()
