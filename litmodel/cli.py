"""What every entry point runs through: ``cli_main`` (one-line errors, allocator tuning) and the one
command-line parser, where a function's signature and docstring become its flags (jsonargparse), with
``--config x.yaml`` and ``--print_config``."""

from __future__ import annotations

import sys
from argparse import RawDescriptionHelpFormatter
from typing import Callable, Optional, Sequence, TypeVar

from litmodel.utils import LitModelError, tune_allocator

T = TypeVar("T")


def cli_main(fn: Callable[..., T]) -> Callable[..., T]:
    """Wrap an entry point: tune the allocator, and print a ``LitModelError`` as one line on stderr
    and exit with 1."""

    def wrapper(*args, **kwargs):
        tune_allocator()
        try:
            return fn(*args, **kwargs)
        except LitModelError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    wrapper.__name__ = getattr(fn, "__name__", "main")
    wrapper.__doc__ = fn.__doc__
    return wrapper


def parse_function_args(fn: Callable, argv: Optional[Sequence[str]] = None, description: str | None = None,
                        default_config_files: Optional[list[str]] = None, instantiate: bool = False) -> dict:
    """Parse ``argv`` (default: ``sys.argv``) into keyword arguments for ``fn``.

    ``default_config_files``: YAML files whose values replace the function's defaults (flags and
    ``--config`` still win). ``instantiate``: build dataclass/class arguments (nested groups such as
    ``--train.lr``) instead of returning them as namespaces.
    """
    # deferred: jsonargparse adds ~0.5 s, paid only when an entry point parses its command line
    from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter

    class HelpFormatter(DefaultHelpFormatter, RawDescriptionHelpFormatter):
        pass

    parser = ArgumentParser(description=description, formatter_class=HelpFormatter,
                            default_config_files=default_config_files)
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML file with any of the options below.")
    parser.add_function_arguments(fn, as_group=False) if instantiate else parser.add_function_arguments(fn)
    cfg = parser.parse_args(argv)
    if instantiate:
        try:
            cfg = parser.instantiate_classes(cfg)
        except Exception as err:  # a LitModelError raised while building e.g. a data module: show just it
            cause = err
            while cause is not None and not isinstance(cause, LitModelError):
                cause = cause.__cause__ or cause.__context__
            if cause is not None:
                raise LitModelError(str(cause)) from None
            raise
    args = cfg.as_dict()
    args.pop("config", None)
    args.pop("__default_config__", None)
    return args
