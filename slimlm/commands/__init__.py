"""Extra `slimlm` subcommands, one module each.

Every module here that does not start with an underscore defines
`register(subparsers) -> None`, adding its subparser(s) with `set_defaults(fn=...)`;
`slimlm.cli` calls it. Adding a command is adding one file.
"""

import importlib
import pkgutil


def register_all(subparsers) -> None:
    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}").register(subparsers)
