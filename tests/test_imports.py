"""What importing pcjax's step and model code pulls in: no TensorFlow, no CLU writers.

The model, the config schema and the train/eval steps must import on an accelerator image that
has JAX, Flax, Optax and Orbax but no TensorFlow (TensorFlow serves only the input pipeline and
the TensorBoard writer, imported when a run starts).
"""

import subprocess
import sys

PROBE = """
import sys
import pcjax.configs.schema, pcjax.nn.models, pcjax.training.sharding, pcjax.training.train
heavy = sorted(m for m in ("tensorflow", "tensorflow_datasets", "clu.metric_writers")
               if m in sys.modules)
print(",".join(heavy) or "none")
"""


def test_steps_and_models_import_without_tensorflow():
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=300
    )
    assert out.stdout.strip().splitlines()[-1] == "none", out.stdout + out.stderr[-2000:]
