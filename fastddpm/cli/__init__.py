"""The ``fastddpm`` command line (also ``python -m fastddpm``): one module per sub-command.

    fastddpm sample                                    # 64 digits from the bundled model -> samples.png
    fastddpm train --dataset digits --out-dir runs/digits
    fastddpm eval | nll | convert | export | bench | tune-steps | inpaint | img2img ...

Each sub-command is a module of this package that defines ``HELP`` (one line), ``configure(parser)``
(adds its arguments) and ``run(args) -> exit status``; :data:`COMMAND_MODULES` lists them in the order
``fastddpm --help`` shows them. Heavy imports (torch, diffusers) stay inside ``run``, so ``--help``
is fast.

Errors the user can fix (missing / truncated / mismatched checkpoints, bad data, bad flags) print one
``fastddpm <command>: error: ...`` line and exit with status 2 (usage) or 1 (everything else).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Dict, Optional, Sequence

from ._common import CLIError, Command, flag_names

__all__ = ["main", "build_parser", "commands", "Command", "CLIError", "COMMAND_MODULES"]

# sub-command name -> module of this package
COMMAND_MODULES: Dict[str, str] = {
    "sample": "sample",
    "train": "train",
    "eval": "eval",
    "nll": "nll",
    "convert": "convert",
    "export": "export",
    "bench": "bench",
    "tune-steps": "tune_steps",
    "distill": "distill",
    "inpaint": "inpaint",
    "img2img": "img2img",
}


def commands() -> Dict[str, Command]:
    """Every sub-command, by name (imports the command modules, which import nothing heavy)."""
    out = {}
    for name, module in COMMAND_MODULES.items():
        mod = importlib.import_module(f"{__name__}.{module}")
        out[name] = Command(mod.HELP, mod.configure, mod.run)
    return out


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="fastddpm", description="Fast denoising diffusion probabilistic models.")
    parser.add_argument("--version", action="version", version=f"fastddpm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, cmd in commands().items():
        sp = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.configure(sp)
        # dest name -> flag, so that errors raised with a library name (image_size) name the flag
        flags = {a.dest: next(o for o in a.option_strings if o.startswith("--"))
                 for a in sp._actions if "_" in a.dest and any(o.startswith("--") for o in a.option_strings)}
        sp.set_defaults(_run=cmd.run, _flags=flags)
    return parser


# fastddpm.train's errors that are about the run, not bugs (named, so that --help imports nothing heavy)
_ONE_LINE_ERRORS = ("NonFiniteLossError", "RunLockError", "DistributedError", "NonFiniteSampleError")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``fastddpm`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt as e:  # train's first Ctrl-C / SIGTERM saves and says where (TrainInterrupted)
        print(f"fastddpm {args.command}: interrupted{f' {e}' if str(e) else ''}", file=sys.stderr)
        return 130
    except Exception as e:
        # CheckpointError and the data loaders' errors are ValueErrors naming the file; a training run
        # stopped by non-finite losses raises NonFiniteLossError. Anything else is a bug: traceback.
        if isinstance(e, (CLIError, ValueError, OSError)) or type(e).__name__ in _ONE_LINE_ERRORS:
            print(f"fastddpm {args.command}: error: {flag_names(str(e), getattr(args, '_flags', {}))}",
                  file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
