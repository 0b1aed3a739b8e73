"""Times the authors' PyTorch code on one benchmark row; prints one JSON line.

    python benchmarks/reference_step.py /path/to/PhaseCollapse --row cifar_b --batch 128

Run by `benchmarks/train_step.py --reference CHECKOUT` in a subprocess of a Python with torch,
right after the pcjax row, so both are measured in the same run on the same machine. It does
what `pcjax`'s benchmark does: the model the authors' `main_block` builds from their `run.py`
flags (`authors_code.PAPER_MODELS`), random data, a train step as their training loop runs it
(cross-entropy, backward, SGD with momentum 0.9 and weight decay 1e-4), the same number of
warm-up and timed steps (median), then the eval forward pass under `no_grad`. Eval runs first:
where the train step does not fit in memory (`--memory-limit-gib`, an address-space limit, so
torch fails with an error rather than being killed), the eval figure is still reported.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from authors_code import PAPER_MODELS, build_model, import_main_block  # noqa: E402


def _median_ips(fn, batch: int, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def measure(checkout: str, row: str, batch: int, steps: int, warmup: int) -> dict:
    torch, main_block = import_main_block(checkout)
    torch.set_num_threads(os.cpu_count())
    flags, size, num_classes = PAPER_MODELS[row]
    torch.manual_seed(0)
    model = build_model(main_block, flags)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, num_classes, (batch,))

    model.eval()

    def eval_step():
        with torch.no_grad():
            model(x)

    result = {
        "row": row,
        "batch": batch,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "eval_ips": _median_ips(eval_step, batch, 1, max(steps, 3)),
    }

    model.train()
    opt = torch.optim.SGD(model.parameters(), 0.01, momentum=0.9, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()

    def train_step():
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    try:
        result["train_ips"] = _median_ips(train_step, batch, warmup, steps)
    except (RuntimeError, MemoryError) as e:  # torch's allocator raises RuntimeError
        if "alloc" not in str(e).lower() and not isinstance(e, MemoryError):
            raise
        result["train_ips"] = None
        result["train_error"] = f"out of memory: {str(e).splitlines()[0][:200]}"
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkout", help="checkout of FlorentinGuth/PhaseCollapse")
    p.add_argument("--row", required=True, choices=list(PAPER_MODELS))
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--memory-limit-gib",
        type=float,
        default=0,
        help="address-space limit of this process (0: none)",
    )
    args = p.parse_args()
    if args.memory_limit_gib > 0:
        limit = int(args.memory_limit_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    print(json.dumps(measure(args.checkout, args.row, args.batch, args.steps, args.warmup)))


if __name__ == "__main__":
    main()
