"""One error style for every CLI: an error the user can fix is one or two lines naming the flag, key or file and
what to change, exit status 2; `--verbose` adds the traceback. Anything else is a bug: its traceback, status 1.

    from genllava_jax import errors

    raise errors.UserError(f"--image={path}: no such file")   # or BadValue (a ValueError), MissingFile, ...

    if __name__ == "__main__":
        errors.run(main)                  # absl CLIs: instead of absl.app.run(main); defines --verbose
    sys.exit(errors.guard(main))          # argparse CLIs: main(argv) -> int; add errors.add_verbose(parser)

Flag parsing errors (absl's, and a config file's or a `--config.x.y=` override's) are user errors too, and so are
absl's `app.UsageError`. Subclasses keep the built-in type callers already catch (`BadValue` is a ValueError,
`MissingFile` a FileNotFoundError, `Diverged` a FloatingPointError).
"""

from __future__ import annotations

import ast
import functools
import os
import re
import sys
import traceback
from typing import Callable, NoReturn

USER_ERROR_STATUS = 2
VERBOSE_HELP = "on an error, show its traceback too"


class UserError(Exception):
    """An error in what the user gave: the message names the flag / key / file and says what to change."""


class BadValue(UserError, ValueError):
    """A flag, config value or file content that cannot be used."""


class MissingFile(UserError, FileNotFoundError):
    """A file or folder the user named does not exist (or lacks what it must hold)."""


class OutputExists(UserError, FileExistsError):
    """An output would replace something the user did not ask to replace."""


class Diverged(UserError, FloatingPointError):
    """Training cannot go on with these settings (too many non-finite steps)."""


class Stopped(UserError, RuntimeError):
    """A run stopped for a reason the user must act on (unusable data, no usable checkpoint)."""


def prog() -> str:
    """The command's name: the module of `python -m pkg.mod`, else the script's file name."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return spec.name.removesuffix(".__main__")
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "genllava_jax"


def report(e: BaseException, verbose: bool = False, message: str | None = None) -> None:
    """Prints `<prog>: error: <message>` on stderr, after the traceback if `verbose`."""
    if verbose:
        traceback.print_exception(e)
    print(f"{prog()}: error: {message or str(e)}", file=sys.stderr, flush=True)


def _exit(e: BaseException, verbose: bool, message: str | None = None) -> NoReturn:
    report(e, verbose, message)
    sys.exit(USER_ERROR_STATUS)


def _verbose_in(argv) -> bool:
    """--verbose before any `--` (what follows `--` belongs to another command)."""
    argv = list(argv)
    head = argv[:argv.index("--")] if "--" in argv else argv
    return any(a in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1") for a in head)


def _unquote(text: str) -> str:
    """ml_collections raises AttributeError(KeyError(msg)): its text is the repr of the message."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        try:
            text = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            pass
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def flag_message(e: BaseException, argv) -> str:
    """One line for an exception raised while parsing flags, naming the flag it came from where it can tell."""
    from absl import flags

    text = str(e)
    if "Traceback (most recent call last)" in text:  # ml_collections puts a config file's traceback in the text
        where = re.findall(r'File "([^"]+)", line (\d+)', text)
        last = [line.strip() for line in text.splitlines() if line.strip()][-1]
        head = text.split(":", 1)[0] if text.startswith("flag --") else "in the flags"
        return f"{head}: {last}" + (f" ({where[-1][0]}:{where[-1][1]})" if where else "")
    text = _unquote(text)
    if isinstance(e, flags.UnrecognizedFlagError):
        tip = text.partition(". Did you mean: ")[2].rstrip(" ?")
        return f"--{e.flagname}: unknown flag; " + (f"did you mean --{tip}?" if tip else "--helpfull lists them")
    if isinstance(e, flags.Error):
        return text
    if isinstance(e, (AttributeError, KeyError)):  # an override of a config key that does not exist
        key = re.match(r"""['"]?([\w-]+)['"]?""", text)
        for arg in argv[1:]:
            name = arg.split("=", 1)[0]
            if key and name.startswith("--") and "." in name and name.rsplit(".", 1)[1] == key.group(1):
                return f"{name}: no such key in the config. {text.removeprefix(key.group(0)).strip()}".strip()
    # an error in a config file: where in the user's files it happened (not in the libraries, not here)
    frames = [(f.filename, f.lineno) for f in traceback.extract_tb(e.__traceback__) if "site-packages" not in
              f.filename and not f.filename.startswith((sys.prefix, "<")) and f.filename != __file__]
    if isinstance(e, SyntaxError):
        frames, text = frames + [(e.filename, e.lineno)], f"{e.msg}"
    given = [a for a in argv[1:] if frames and "=" in a and os.path.abspath(a.split("=", 1)[1].split(":")[0])
             == os.path.abspath(frames[-1][0])]
    where = f" ({frames[-1][0]}:{frames[-1][1]})" if frames else ""
    return f"{f'flag {given[0]}' if given else 'in the flags'}: {type(e).__name__}: {text}{where}"


def _parse_flags(argv):
    from absl import flags

    try:
        rest = flags.FLAGS(argv)
    except Exception as e:  # absl's flags.Error, and whatever a config file or an override raises
        _exit(e, _verbose_in(argv), flag_message(e, argv))
    for name in flags.FLAGS:  # ml_collections defers a config file's load error to its first use: report it now
        value = flags.FLAGS[name].value
        if type(value).__name__ == "_ErrorConfig":
            e = object.__getattribute__(value, "_error")
            last = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
            given = next((a for a in argv if a.startswith(f"--{name}=")), f"--{name}")
            _exit(e, _verbose_in(argv), f"{given}: cannot load the config file: {last}")
    return rest


def _call(main: Callable, argv):
    from absl import app, flags

    try:
        return main(argv)
    except (UserError, app.UsageError, flags.Error) as e:
        _exit(e, flags.FLAGS["verbose"].value)


def run(main: Callable, argv=None) -> NoReturn:
    """`absl.app.run(main)` with the user-error style (defines the `--verbose` flag)."""
    from absl import app, flags

    if "verbose" not in flags.FLAGS:
        flags.DEFINE_bool("verbose", False, VERBOSE_HELP)
    app.run(functools.partial(_call, main), argv=argv, flags_parser=_parse_flags)


def add_verbose(parser) -> None:
    """The `--verbose` flag on an argparse parser (for `guard`)."""
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)


def guard(main: Callable[[list[str]], int], argv=None) -> int:
    """Runs an argparse CLI's `main(argv) -> int`; a UserError is reported and gives status 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return main(argv)
    except UserError as e:
        report(e, _verbose_in(argv))
        return USER_ERROR_STATUS
