"""Command-line parsing shared by every `speechlm-*` entry point.

Each console command is an `argparse` program; this module holds the argument types they
share (a corpus source `TYPE:PATH`, mesh axis sizes, module lists) and `run_command`, which
turns a command's outcome into its exit status the same way everywhere: 0 on success, 2 with
one line on standard error for a user error (a bad flag value, a missing file, a config that
cannot work), 1 for anything else (an internal error, with its traceback).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Sequence

SOURCE_TYPES = ("manifest", "librispeech", "tfds")


class UsageError(ValueError):
    """A command-line value or input that cannot work; reported in one line with exit status 2."""


def parse_source(spec: str) -> dict[str, str]:
    """"manifest:/path" | "librispeech:/dir" | "tfds:/dir" -> the pipeline's source spec."""
    kind, sep, path = spec.partition(":")
    if not sep or kind not in SOURCE_TYPES or not path:
        raise argparse.ArgumentTypeError(f"must be TYPE:PATH with TYPE in {SOURCE_TYPES}, got {spec!r}")
    return {"type": kind, "path": path}


def parse_mesh(spec: str) -> dict[str, int]:
    """"data=-1" / "fsdp=2,tensor=4" -> mesh axis sizes."""
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
    """"a,b, c" -> ("a", "b", "c"); empty parts are dropped."""
    return tuple(part.strip() for part in spec.split(",") if part.strip())


def run_command(prog: str, body: Callable[[], object], user_errors: Sequence[type[BaseException]] = ()) -> int:
    """Runs a command's body; returns its exit status (0 ok, 2 user error, 1 internal error)."""
    try:
        body()
    except (UsageError, FileNotFoundError, *user_errors) as error:
        sys.stderr.write(f"{prog}: {error}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130
    except Exception:  # noqa: BLE001 - the one place that reports an unexpected failure
        traceback.print_exc()
        return 1
    return 0
