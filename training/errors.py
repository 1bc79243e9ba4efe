"""One behaviour for user errors in every command-line entry point.

A user error (bad flag value, missing or mismatched file, bad config) prints exactly one line
`error: <what is wrong and how to fix it>` on stderr and exits with status 2, without a traceback;
`--debug` re-raises it so the traceback shows. Use:

    def main(argv=None):
        args = make_parser(description=__doc__).parse_args(argv)
        ...

    if __name__ == "__main__":
        sys.exit(run_cli(main))
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

USER_ERROR_STATUS = 2  # argparse's own status for bad arguments


class CLIParser(argparse.ArgumentParser):
    """argparse without prefix matching (`--per-clas` is an error, not `--per-class`) and with one-line
    errors in the same format as `run_cli`'s."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(USER_ERROR_STATUS, f"error: {message} (see `{self.prog} --help`)\n")


def make_parser(description: str | None = None, **kwargs) -> CLIParser:
    parser = CLIParser(description=description, **kwargs)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser


def is_user_error(err: BaseException) -> bool:
    if isinstance(err, (ValueError, KeyError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError,
                        IsADirectoryError, PermissionError)):
        return True
    # looked up, not imported: a CheckpointMismatchError can only come from an already loaded module, and
    # argparse's early exits stay free of the torch import
    checkpoint = sys.modules.get("training.checkpoint")
    return checkpoint is not None and isinstance(err, checkpoint.CheckpointMismatchError)


def one_line(err: BaseException) -> str:
    """The exception's message on one line (KeyError's str() would quote it)."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.filename}: {err.strerror.lower()}; check the path"
    elif isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        text = err.args[0]
    else:
        text = str(err) or type(err).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def run_cli(main: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> int:
    """Run `main(argv)`; a user error becomes one `error:` line and status 2 (unless `--debug` is given).
    Returns the exit status: main's own int result, else 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        result = main(argv)
    except SystemExit as err:
        if not isinstance(err.code, str) or "--debug" in argv:
            raise  # argparse and --help exit with an int and have printed already
        # `raise SystemExit("message")` is the older idiom for a user error: same line, same status
        print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
        return USER_ERROR_STATUS
    except Exception as err:
        if not is_user_error(err) or "--debug" in argv:
            raise
        print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
        return USER_ERROR_STATUS
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
