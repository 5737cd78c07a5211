"""What every command-line script shares: a quiet start, `--help` with defaults, and user errors
as one line.

A user error (a bad config key or value, a missing path, a tokenizer mismatch, a busy run
folder, ...) prints `error: <message>` on stderr and exits with status 2; the traceback is shown
only with TESSERA_DEBUG=1. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch

DEBUG_ENV = "TESSERA_DEBUG"


def quiet_startup() -> None:
    """Silence start-up noise that tells the user nothing: DeepSpeed's "Setting accelerator to
    CPU" warning on machines without a GPU (naming the CPU accelerator is what it asks for)."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")


quiet_startup()  # on import: before accelerate / deepspeed are imported by the scripts


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every default and keeps the docstring's layout."""


def parser(doc: str | None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)


def options_yaml(namespace: argparse.Namespace) -> str:
    """A script's resolved options as YAML (what --print-config shows)."""
    import yaml

    options = {k: str(v) if isinstance(v, os.PathLike) else v for k, v in vars(namespace).items()
               if k != "print_config"}  # fmt: skip
    return yaml.safe_dump(options, sort_keys=False)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that describe bad input, not a bug (their messages name the problem)."""
    from training.checkpoint import CheckpointError
    from training.config import ConfigError
    from training.loop import NonFiniteLossError
    from training.run_lock import RunFolderBusyError
    from training.serialization import WriteError

    return (ConfigError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
            RunFolderBusyError, CheckpointError, WriteError, NonFiniteLossError)  # fmt: skip


def run(main: Callable[..., Any], argv: list[str] | None = None) -> Any:
    """Call `main(argv)`; a user error becomes one `error:` line on stderr and exit status 2."""
    try:
        return main(argv)
    except user_errors() as err:
        if os.environ.get(DEBUG_ENV) == "1":
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
