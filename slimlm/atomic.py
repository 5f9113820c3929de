"""Writing a whole output directory atomically.

    with atomic_directory(dest, overwrite) as tmp:
        ...write files into tmp...

The files go to a temporary sibling of `dest`, renamed into place only when the block
finishes; on any error the temporary is removed and an existing `dest` is untouched.
An existing `dest` is refused unless `overwrite`, and then replaced only once the new
directory is complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from slimlm.errors import SlimlmError


@contextmanager
def atomic_directory(dest: str | Path, overwrite: bool = False):
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise SlimlmError(f"output {dest} already exists; choose another path or pass --force to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    try:
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
