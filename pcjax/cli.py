"""Command-line entry shared by the experiment mains: flags, logging, then `launch.run`.

Each main is `cli.main(default_config)`; anything a notebook needs is `pcjax.training.launch.run` or
`loop.train_and_evaluate`, not this module. Exit status: 0 finished, 1 error (one line;
an unexpected error's traceback goes to a file it names), `preemption.PREEMPTED_EXIT_CODE` (143)
stopped by SIGTERM after saving. With `--compile_for=TARGET` the mains train nothing: they
compile the steps for that accelerator (`accelerators.compile_only`) and print the report, or exit 1
with the one-line answer when the step does not fit.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys


def _presets(config_spec: str) -> str:
    """The presets a config file names (its PRESETS tuples, or its get_config docstring)."""
    path = config_spec.split(":", 1)[0]
    try:
        spec = importlib.util.spec_from_file_location("_pcjax_config_for_help", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as error:  # help must not fail on a config that does not import
        return f"(could not read {path}: {error})"
    names = [p for attr in dir(module) if attr.endswith("PRESETS") for p in getattr(module, attr)]
    if names:
        return ", ".join(sorted(set(names))) + " (each may end in ',smoke': a few steps)"
    return (module.get_config.__doc__ or "").strip()


def _usage(default_config: str) -> str:
    main_doc = (sys.modules["__main__"].__doc__ or "").strip()
    return f"""{main_doc}

Config: --config=FILE[:PRESET] (default {default_config}).
Presets of {default_config.split(":", 1)[0]}: {_presets(default_config)}
Override any field after it: --config.train.num_steps=100 --config.optim.learning_rate=0.1
  --config.model.widths='(8,16)'  (the keys are those of pcjax.configs.schema.default_config).
Multi-process: --coordinator_address=HOST:PORT --num_processes=N --process_id=I on every
  process (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), or --distributed
  to detect them from SLURM, Open MPI, Kubernetes or Cloud TPU.
Exit status: 0 finished, 1 error, 143 stopped by SIGTERM after saving (rerun to resume).
Before paying for a slice: --compile_for=v5e-8 (or v5e-256, v4-32, v5p-128, v6e-8, h100-8,
  local, ...) compiles the train and eval steps for it on this machine and prints per-chip
  memory, FLOPs, traffic and estimated img/s; no dataset or workdir needed.
"""


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def main(default_config: str) -> None:
    """Defines the flags, hides accelerators from TF, trains, prints the final eval."""
    from absl import app, flags, logging
    from ml_collections import config_flags

    from pcjax.configs import schema
    from pcjax.training import checkpoint, launch, loop, preemption, workdir

    try:  # ml_collections applies the --config.* overrides here
        config = config_flags.DEFINE_config_file(
            "config", default_config, "Experiment config (FILE[:PRESET]).", lock_config=True
        )
    except (KeyError, AttributeError, ValueError, TypeError) as error:
        sys.exit(f"error: ConfigError: {_bad_override(sys.argv[1:], error)}")
    workdir_flag = flags.DEFINE_string(
        "workdir", None, "Local folder or URL (gs://bucket/run) for checkpoints and events."
    )
    distributed = flags.DEFINE_bool(
        "distributed",
        os.environ.get("PCJAX_DISTRIBUTED", "0") == "1",
        "Join a multi-process job found from the cluster environment (or PCJAX_DISTRIBUTED=1).",
    )
    coordinator = flags.DEFINE_string(
        "coordinator_address",
        os.environ.get("JAX_COORDINATOR_ADDRESS"),
        "HOST:PORT of process 0 (default $JAX_COORDINATOR_ADDRESS); with the two below.",
    )
    num_processes = flags.DEFINE_integer(
        "num_processes", _env_int("JAX_NUM_PROCESSES"), "Processes in the job."
    )
    process_id = flags.DEFINE_integer(
        "process_id", _env_int("JAX_PROCESS_ID"), "This process's index, 0..num_processes-1."
    )
    compile_for = flags.DEFINE_string(
        "compile_for",
        None,
        "Train nothing: compile the steps for this accelerator (v5e-8, v4-32, v5p-128, h100-8, "
        "local, ...) and print memory, FLOPs and estimated speed.",
    )
    expected = (
        schema.ConfigError,
        checkpoint.CheckpointError,
        workdir.WorkdirError,
        loop.Diverged,
    )

    def run(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments {argv[1:]}.")
        if compile_for.value:
            _compile_for(config.value, compile_for.value)
            return
        if not workdir_flag.value:
            raise app.UsageError("--workdir is required.")
        # Before anything starts TF's runtime (the event writer, the input pipeline); not at
        # import, so that --help and a bad flag or preset answer without loading TensorFlow.
        from pcjax.data import preprocessing

        preprocessing.hide_accelerators_from_tf()
        logging.set_verbosity(logging.INFO)
        try:
            result = launch.run(
                config.value,
                workdir_flag.value,
                distributed.value,
                coordinator.value,
                num_processes.value,
                process_id.value,
            )
        except preemption.Preempted as stopped:
            logging.warning("%s", stopped)
            sys.exit(preemption.PREEMPTED_EXIT_CODE)
        except expected as error:
            sys.exit(f"error: {type(error).__name__}: {error}")
        except Exception as error:  # anything else: one line, the traceback in a file
            sys.exit(f"error: {checkpoint.first_line(error, 500)} (details: {_log_traceback()})")
        print(f"final eval: {json.dumps(result)}")

    app.run(run, flags_parser=_parser(default_config, app))


def _bad_override(args: list[str], error: BaseException) -> str:
    """One line for a --config.* override that names no field: the key and the valid ones."""
    from pcjax.configs import schema

    schema = schema.default_config()
    for arg in args:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config.") :].split("=", 1)[0]
        node, done = schema, []
        for key in path.split("."):
            if not hasattr(node, "keys") or key not in node:
                where = f"config.{'.'.join(done)}" if done else "config"
                valid = sorted(node.keys()) if hasattr(node, "keys") else []
                return f"Unknown config key {path!r} in {arg}; valid keys of {where}: {valid}."
            node, done = node[key], [*done, key]
    return f"Bad --config override ({type(error).__name__}: {str(error).strip()[:300]})."


def _log_traceback() -> str:
    """Writes the current exception's traceback to a temporary file; its path."""
    import tempfile
    import traceback

    path = os.path.join(tempfile.gettempdir(), f"pcjax-error-{os.getpid()}.txt")
    try:
        with open(path, "w") as f:
            traceback.print_exc(file=f)
    except OSError:  # no room even for that: the traceback goes to stderr
        traceback.print_exc()
        return "the traceback above"
    return path


def _compile_for(config, target: str) -> None:
    """The --compile_for path: the report on stdout, or one line and exit status 1."""
    from pcjax.accelerators import compile_only, targets
    from pcjax.configs import schema

    try:
        print(compile_only.check(config, target))
    except (ValueError, targets.MissingCompiler, compile_only.OutOfMemory) as error:
        kind = "" if isinstance(error, compile_only.OutOfMemory) else "error: "
        if isinstance(error, schema.ConfigError):
            kind = "error: ConfigError: "
        sys.exit(f"{kind}{error}")


def _parser(default_config: str, app):
    """absl's parser, with --help printing pcjax's usage (presets, overrides) and exiting 0."""

    def parse(argv: list[str]) -> list[str]:
        if any(a in ("--help", "-h", "--helpfull") for a in argv[1:]):
            from absl import flags

            print(_usage(default_config))
            print(flags.FLAGS.module_help(__name__))
            print(flags.FLAGS.module_help("ml_collections.config_flags.config_flags"))
            sys.exit(0)
        from absl import flags

        try:  # with --config=FILE, ml_collections applies the --config.* overrides here
            return flags.FLAGS(argv)
        except flags.Error as error:  # absl would print the config file's whole traceback
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            if "parsing config file" in lines[0]:  # the config's own error is its last line
                sys.exit(f"error: ConfigError: {lines[-1]}")
            sys.exit(f"error: {lines[0]} (see --help)")
        except (KeyError, AttributeError, ValueError, TypeError) as error:
            sys.exit(f"error: ConfigError: {_bad_override(argv[1:], error)}")

    return parse
