"""The one runner behind every `python -m lmops_jax.<job>`: logging, XLA flags (`xla_flags`; training's malloc
setting, `host_memory`, is made by `python -m lmops_jax.train` before its imports), the compilation cache
(`compile_cache`), flags, jax.distributed, exit codes.

A job is one of two shapes, so each entry point stays a few lines:
  GinJob(fn, bound_by)          train, infer, `distillation dump_topk`: flags --gin_file, --gin.NAME=VALUE,
                                --gin_search_paths and the jax.distributed flags; calls `fn` as gin binds it.
  ArgsJob(help, add_flags, call)  convert, `checkpoints inspect`, `peft.lora merge`: plain argparse flags.
`run(prog, description, job_or_commands, argv)` parses argv (a mapping gives sub-commands) and runs it.

Exit codes:
  0    done.
  2    a bad configuration: one `error: ...` line on stderr naming the problem. That is any ValueError
       raised by lmops_jax's own code (GinConfigError, CheckpointError, ConversionError and the library's
       argument checks all are ValueErrors); a ValueError raised deeper, inside JAX or another library,
       is a bug and keeps its traceback. Flag syntax errors come from argparse, also with code 2.
  128 + signal number  after a job saved its state on a signal and raised `Preempted` (143 SIGTERM,
       130 SIGINT); running the same command again resumes.

`python -m pkg.mod` executes the file a second time as a module named `__main__`, while gin files,
isinstance checks and registries refer to the importable `pkg.mod`. So right after its imports, before
it defines anything, every job module hands over: `if __name__ == "__main__": runner.run_as_main("pkg.mod")`
imports the importable module, calls its `main` and exits.
"""
from __future__ import annotations

import argparse
import atexit
import dataclasses
import importlib
import logging
import os
import signal
import sys
import threading
import traceback
from typing import Any, Callable, Mapping, NoReturn, Protocol, Sequence

import jax

from lmops_jax.cli import compile_cache, gin_flags, host_memory, xla_flags

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Preempted(RuntimeError):
    """A job stopped on a signal after saving a checkpoint at `step`; the runner exits 128 + signal."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(f"{signal_name} received: saved a checkpoint at step {step}; run the same command "
                         "again to resume")
        self.step = step
        self.signal_name = signal_name


class Job(Protocol):
    """What `run` needs of a job: a one-line help, its flags, and the call that runs it."""
    help: str

    def add_flags(self, parser: argparse.ArgumentParser) -> None: ...

    def call(self, args: argparse.Namespace) -> Any: ...


@dataclasses.dataclass(frozen=True)
class ArgsJob:
    """A job with plain argparse flags: `add_flags(parser)` declares them, `call(args)` runs."""
    help: str
    add_flags: Callable[[argparse.ArgumentParser], None]
    call: Callable[[argparse.Namespace], Any]


@dataclasses.dataclass(frozen=True)
class GinJob:
    """A job configured by gin: `fn` is called with the arguments the gin files bind to it.

    bound_by: the gin file that binds `fn`, named in the error when the given files bind nothing to it.
    pass_config_str: also pass `config_str=` the operative gin config (train stores it with checkpoints).
    """
    fn: Callable[..., Any]
    bound_by: str
    help: str = ""
    pass_config_str: bool = False

    def add_flags(self, parser: argparse.ArgumentParser) -> None:
        gin_flags.add_flags(parser)
        group = parser.add_argument_group("multi-process (jax.distributed)")
        group.add_argument("--multihost", action="store_true",
                           help="jax.distributed.initialize() with the cluster auto-detected (TPU, SLURM, ...)")
        group.add_argument("--coordinator_address", default=None, help="host:port of process 0")
        group.add_argument("--num_processes", type=int, default=None)
        group.add_argument("--process_id", type=int, default=None)
        group.add_argument("--cpu_collectives", default=None, help="e.g. 'gloo' for multi-process CPU runs")

    def call(self, args: argparse.Namespace) -> Any:
        import gin

        bindings = gin_flags.bindings_from_flags(args.unparsed)
        initialize_distributed(args)
        files = gin_flags.parse(args.gin_file, bindings, args.gin_search_paths.split(","))
        logging.info("gin files: %s", ", ".join(files))
        try:
            configured = gin.get_configurable(self.fn)
        except ValueError as e:
            raise gin_flags.GinConfigError(
                f"the gin files bind nothing to {self.fn.__module__}.{self.fn.__qualname__}; include "
                f"{self.bound_by} ({e})") from e
        return configured(**({"config_str": gin.config_str()} if self.pass_config_str else {}))


def initialize_distributed(args: argparse.Namespace) -> None:
    """`jax.distributed.initialize` when asked: explicit flags, or `--multihost` to let JAX detect the
    cluster (TPU pods, SLURM, Open MPI, Kubernetes). Runs before anything touches the devices."""
    if args.coordinator_address:
        if args.num_processes is None or args.process_id is None:
            raise gin_flags.GinConfigError("--coordinator_address needs --num_processes and --process_id")
        if args.cpu_collectives:
            jax.config.update("jax_cpu_collectives_implementation", args.cpu_collectives)
        jax.distributed.initialize(args.coordinator_address, num_processes=args.num_processes,
                                   process_id=args.process_id)
    elif args.multihost:
        jax.distributed.initialize()
    else:
        return
    logging.info("jax.distributed: process %d of %d, %d devices", jax.process_index(), jax.process_count(),
                 jax.device_count())


class _LibraryProgress(logging.Filter):
    """Passes lmops_jax's progress (root logger and `lmops_jax.*`) at INFO, everyone else from WARNING:
    orbax (through absl), seqio and TensorFlow log every file operation at INFO."""

    def filter(self, record: logging.LogRecord) -> bool:
        return (record.levelno >= logging.WARNING or record.name == "root"
                or record.name.split(".")[0] == "lmops_jax")


def configure_logging() -> None:
    """INFO progress on stdout (errors go to stderr as `error: ...`), third-party loggers at WARNING."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout,
                        force=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_LibraryProgress())


def build_parser(prog: str, description: str, jobs: Job | Mapping[str, Job]) -> argparse.ArgumentParser:
    """One parser for a job, or a parser with one sub-command per job; `args.job` is the job chosen."""
    options = dict(allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser = argparse.ArgumentParser(prog=prog, description=description, **options)
    if isinstance(jobs, Mapping):
        commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
        parsers = [(commands.add_parser(name, help=job.help, description=job.help, **options), job)
                   for name, job in jobs.items()]
    else:
        parsers = [(parser, jobs)]
    for job_parser, job in parsers:
        job.add_flags(job_parser)
        job_parser.set_defaults(job=job)
    return parser


def _is_config_error(error: BaseException) -> bool:
    """A ValueError whose innermost frame is lmops_jax code: the library's own check of its inputs."""
    if not isinstance(error, ValueError) or error.__traceback__ is None:
        return False
    raised_in = os.path.abspath(traceback.extract_tb(error.__traceback__)[-1].filename)
    return raised_in.startswith(_PACKAGE_DIR + os.sep)


def _one_line(error: BaseException) -> str:
    """The message as one line, without the '\n  In call to configurable ...' lines gin appends to an error
    raised in a call it makes (the library's message names the binding already)."""
    lines = (line.strip() for line in str(error).splitlines())
    return "; ".join(line for line in lines if line and not line.startswith("In call to configurable "))


def run(prog: str, description: str, jobs: Job | Mapping[str, Job], argv: Sequence[str] | None = None, *,
        workload: str = xla_flags.INFERENCE) -> int:
    """Parses argv (default sys.argv[1:]), runs the chosen job and returns the exit code (module docstring).
    `workload` ('training' or 'inference') picks the CPU XLA flags set first (`xla_flags`)."""
    configure_logging()
    xla_flags.configure(workload)
    if workload == xla_flags.TRAINING:
        host_memory.log_state()
    compile_cache.configure()
    parser = build_parser(prog, description, jobs)
    try:
        args, unparsed = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
        args.unparsed = unparsed
        if unparsed and not isinstance(args.job, GinJob):  # only gin jobs take --gin.NAME=VALUE
            parser.error(f"unrecognized arguments: {' '.join(unparsed)}")
    except SystemExit as e:  # --help, or argparse reporting a flag error
        return int(e.code or 0)
    try:
        args.job.call(args)
    except Preempted as stopped:
        logging.warning("%s", stopped)
        return 128 + signal.Signals[stopped.signal_name].value
    except ValueError as error:
        if not _is_config_error(error):
            raise
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2
    return 0


def run_as_main(module_name: str) -> NoReturn:
    """The `__main__` block of every job module: exits with the importable module's `main()` (an exception it
    raises, a bug, exits as Python does, with its traceback)."""
    exit_without_teardown(importlib.import_module(module_name).main())


def exit_without_teardown(code: int | None) -> NoReturn:
    """Exits as `sys.exit(code)` does, less the interpreter's teardown of modules and native libraries.

    That teardown took 2.1-2.4 s after a training job's last atexit handler (TensorFlow's and XLA's state being
    destroyed, docs/benchmarks.md), for nothing a job leaves behind. What a normal exit does that matters
    is done first: non-daemon threads are waited for, the atexit handlers run (jax.distributed's shutdown,
    Orbax's and Ray's), logging and the standard streams are flushed."""
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0 if code is None else code)
