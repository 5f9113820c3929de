"""`python -m slimlm.kernels [--check] [--json]`: what the C kernels run on this CPU.

    ISA in use, the ISAs this CPU can run, whether OpenMP is on; `--check` exits 1 with one
    sentence when the extension did not build (the Makefile's install step runs it, so a
    failed build is reported there, not discovered at run time).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m slimlm.kernels", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    p.add_argument("--check", action="store_true", help="exit 1 when the C kernels are not built")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    a = p.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from slimlm.kernels import describe

        d = describe()
    if a.json:
        print(json.dumps(d))
    elif d["built"]:
        extra = "" if d["openmp"] else " (built without OpenMP: one thread)"
        print(f"slimlm kernels: {d['isa']} in use; this CPU runs {', '.join(d['isas'])}{extra}")
    if not d["built"] and (a.check or not a.json):
        print("slimlm: the C kernels did not build (see the compiler output of the install above); "
              "only the slow PyTorch reference path is available", file=sys.stderr)
        return 1 if a.check else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
