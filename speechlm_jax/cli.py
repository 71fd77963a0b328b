"""Command-line parsing shared by every `speechlm-*` entry point.

Each console command is an `argparse` program; this module holds the argument types they
share (a corpus source `TYPE:PATH`, mesh axis sizes, module lists) and `run_command`, which
turns a command's outcome into its exit status the same way everywhere: 0 on success, 2 with
one line on standard error for a user error (a bad flag value, a missing file, a config that
cannot work), 1 for anything else (an internal error, with its traceback).

Every entry point is `main(argv=None) -> int` around a function that returns the command's
result (`evaluation.main.evaluate`, `evaluation.targets.generate_targets`, ...), which library
code calls instead of building argv lists. `ArgumentParser` keeps argparse's own errors to one
line too; `setup_logging` is how a command sets its log level (`--log_level`). The recipe
config flags (`--config FILE.py:VARIANT`, `--config.<key>=value`) are parsed by
`train.config.parse_command_line`. No module keeps global flag state, so any entry points
import together in one process.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence

# Speech source types (data.mixture opens each); `TYPE:PATH` on the command line.
SOURCE_TYPES = ("manifest", "librispeech", "tfds", "hf", "lhotse", "nemo")


class UsageError(ValueError):
    """A command-line value or input that cannot work; reported in one line with exit status 2."""


class CommandFailed(RuntimeError):
    """An outcome that is not a success and not a bug (a config that does not fit, items that
    failed to synthesise); reported in one line with exit status 1."""


def url_problem(value: str) -> str | None:
    """Why `value` cannot be used as a path, when it is a URL this project cannot open (an
    unknown scheme such as `ftp://`, or `s3://`, see `storage.NOT_YET`), else None (`storage.path_problem`)."""
    from speechlm_jax import storage

    return storage.path_problem(value)


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


class ArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose usage errors are one line on standard error (exit status 2).

    The full usage stays in `--help`; subcommand parsers (`add_subparsers`) inherit the class.
    An argument whose value is a URL of a scheme that cannot be opened (`--workdir ftp://host/run`)
    is a usage error (`url_problem`); gs:// paths pass.
    """

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, rest = super().parse_known_args(args, namespace)
        for name, value in vars(parsed).items():
            for text in _strings(value):
                problem = url_problem(text)
                if problem:
                    self.error(f"argument --{name}: {problem}")
        return parsed, rest


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def add_log_level(parser: argparse.ArgumentParser, default: str = "INFO") -> None:
    parser.add_argument(
        "--log_level", default=default, choices=LOG_LEVELS, help=f"logging threshold (default {default})"
    )


def setup_logging(level: str = "INFO") -> None:
    """Log records (stdlib and absl.logging alike) at `level` and above go to standard error."""
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(levelname).1s%(asctime)s %(process)d %(filename)s:%(lineno)d] %(message)s",
    )
    logging.getLogger().setLevel(level)


def parse_source(spec: str) -> dict[str, str]:
    """ "manifest:/path" | "librispeech:/dir" | "hf:/dir" | ... -> the pipeline's source spec (an hf
    source with its default split and columns: train, audio, text)."""
    kind, sep, path = spec.partition(":")
    if not sep or kind not in SOURCE_TYPES or not path:
        raise argparse.ArgumentTypeError(f"must be TYPE:PATH with TYPE in {SOURCE_TYPES}, got {spec!r}")
    return {"type": kind, "path": path}


def parse_mesh(spec: str) -> dict[str, int]:
    """ "data=-1" / "fsdp=2,tensor=4" -> mesh axis sizes."""
    out = {}
    for part in filter(None, spec.split(",")):
        axis, sep, size = part.partition("=")
        try:
            out[axis.strip()] = int(size)
        except ValueError:
            raise argparse.ArgumentTypeError(f"mesh must be AXIS=SIZE[,AXIS=SIZE...], got {spec!r}") from None
        if not sep:
            raise argparse.ArgumentTypeError(f"mesh must be AXIS=SIZE[,AXIS=SIZE...], got {spec!r}")
    return out


def parse_list(spec: str) -> tuple[str, ...]:
    """ "a,b, c" -> ("a", "b", "c"); empty parts are dropped."""
    return tuple(part.strip() for part in spec.split(",") if part.strip())


def _one_line(error: BaseException) -> str:
    text = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text or type(error).__name__


def run_command(prog: str, body: Callable[[], object], user_errors: Sequence[type[BaseException]] = ()) -> int:
    """Runs a command's body; returns its exit status (0 ok, 2 user error, 1 internal error).

    The body parses its own arguments: argparse's exits (`--help` 0, a bad flag 2) become the
    status. `CommandFailed` is 1 with its message; whatever the body returns is ignored.
    """
    try:
        body()
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        sys.stderr.write(f"{prog}: {exit_.code}\n")
        return 1
    except (UsageError, FileNotFoundError, *user_errors) as error:
        sys.stderr.write(f"{prog}: {_one_line(error)}\n")
        return 2
    except CommandFailed as error:
        sys.stderr.write(f"{prog}: {_one_line(error)}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130
    except Exception:  # noqa: BLE001 - the one place that reports an unexpected failure
        traceback.print_exc()
        return 1
    return 0
