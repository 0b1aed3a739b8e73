"""What importing pcjax's step and model code pulls in: no TensorFlow, no CLU writers.

The model, the config schema and the train/eval steps must import on an accelerator image that
has JAX, Flax, Optax and Orbax but no TensorFlow (TensorFlow serves only the input pipeline and
the TensorBoard writer, imported when a run starts). Validating a config, its data directory
included, loads no TensorFlow either; the dataset table and the sampler load not even JAX.
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


VALIDATE = """
import os, sys, tempfile
from pcjax.configs import schema
cfg = schema.default_config()
cfg.data.name = "digits"
schema.validate_data(cfg)
root = tempfile.mkdtemp()
cfg.data.name, cfg.data.data_dir = "cifar10", root
try:
    schema.validate_data(cfg)
    raise SystemExit("a missing dataset was accepted")
except schema.ConfigError as error:
    assert "tfds build cifar10 --file_format=array_record" in str(error), error
for split in ("train", "test"):
    os.makedirs(f"{root}/cifar10/3.0.2", exist_ok=True)
    open(f"{root}/cifar10/3.0.2/cifar10-{split}.array_record-00000-of-00001", "w").close()
schema.validate_data(cfg)
heavy = sorted(m for m in ("tensorflow", "tensorflow_datasets") if m in sys.modules)
print(",".join(heavy) or "none")
"""

DATA_TABLE = """
import sys
import pcjax.data.datasets, pcjax.data.prepared, pcjax.data.sampler
heavy = sorted(m for m in ("jax", "tensorflow", "tensorflow_datasets") if m in sys.modules)
print(",".join(heavy) or "none")
"""


def test_config_and_data_validation_loads_no_tensorflow():
    for probe in (VALIDATE, DATA_TABLE):
        out = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=300
        )
        assert out.stdout.strip().splitlines()[-1] == "none", out.stdout + out.stderr[-2000:]
