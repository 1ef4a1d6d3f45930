"""Outputs that appear together or not at all.

A command that writes a table, its JSON sidecar and a figure must not leave
the table behind when the figure fails, nor half a set of maps when the disk
fills up.  :class:`OutputSet` stages every output under a hidden temporary
name in its destination folder (:class:`petbind.core.files.atomic_output`)
and renames them all only when the whole set is written::

    with OutputSet() as outs:
        outs.stage(tsv_path)                 # checked now, before any work
        outs.stage(png_path)
        ...compute...
        outs.write(tsv_path, write_table_tsv, columns, rows)   # any writer(path, ...)
        outs.write(png_path, plot_tac_fits, ...)
    # here both exist; after an exception neither does

An ``OSError`` while writing or renaming (e.g. errno 28, no space left on
device) is re-raised as :class:`OutputWriteError` (a ``ValueError``) naming
the destination; staged files and folders created for them are removed, and
destinations renamed before the failure are put back as they were.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from pathlib import Path

from petbind.core.files import atomic_output

logger = logging.getLogger(__name__)

__all__ = ["OutputSet", "OutputWriteError", "output_set"]


class OutputWriteError(ValueError):
    """An output could not be written (disk full, permissions...); reported as one line."""


#: errno values that only a write produces (an OSError from reading an input is not one of ours).
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


class OutputSet:
    """Stage several output files and rename them into place together.

    Use as a context manager: the set is committed when the block ends
    normally and discarded when it raises.

    :meth:`stage` checks a destination and reserves a temporary file for it
    (call it up front, so that a bad output path fails before any work);
    :meth:`write` fills it.  Only written files are committed: a reservation
    that was never written is dropped, it never becomes an empty file.
    """

    def __init__(self):
        self._staged: dict[Path, atomic_output] = {}
        self._made_dirs: list[Path] = []
        self._current: Path | None = None
        self._written: set[Path] = set()
        self.committed: list[Path] = []

    # ------------------------------------------------------------------ staging
    def stage(self, path) -> Path:
        """Check ``path`` and return the temporary path to write it to.

        Missing parent folders are created (and removed again if the set is
        discarded).

        Raises
        ------
        petbind.core.files.OutputPathError
            ``path`` exists and is not a regular file, or a parent is a file.
        """
        dest = Path(path)
        if dest in self._staged:
            return self._staged[dest].tmp_path
        missing = []
        anc = dest.parent if str(dest.parent) else Path(".")
        while not anc.exists() and anc != anc.parent:
            missing.append(anc)
            anc = anc.parent
        try:
            out = atomic_output(dest, make_parents=True)
        except OSError as exc:
            raise OutputWriteError(f"{dest}: cannot create output ({exc.strerror or exc})") from None
        finally:
            self._made_dirs.extend(d for d in missing if d.is_dir() and d not in self._made_dirs)
        self._staged[dest] = out
        return out.tmp_path

    def write(self, path, writer, *args, **kwargs) -> Path:
        """Stage ``path`` and call ``writer(staged_path, *args, **kwargs)``.

        Returns
        -------
        Path
            ``path`` (the final name; it exists once the set is committed).

        Raises
        ------
        OutputWriteError
            The writer raised an ``OSError`` (disk full, ...): names ``path``.
        """
        dest = Path(path)
        tmp = self.stage(dest)
        self._current = dest
        try:
            writer(tmp, *args, **kwargs)
        except OSError as exc:
            raise self._write_error(exc) from None
        finally:
            self._current = None
        self._written.add(dest)
        return dest

    @property
    def paths(self) -> list[Path]:
        """Destinations staged so far, in staging order."""
        return list(self._staged)

    # ------------------------------------------------------------ commit/discard
    def commit(self) -> list[Path]:
        """Rename every staged file into place; all or nothing.

        Returns
        -------
        list of Path
            The destinations, in staging order.
        """
        for dest in [d for d in self._staged if d not in self._written]:
            self._staged.pop(dest).discard()  # reserved, never written
        done = []  # (dest, whether it existed, hard-link backup of the file it replaced)
        backup = None
        try:
            for dest, out in self._staged.items():
                self._current = dest
                backup = None
                existed = dest.exists()
                if existed:
                    # A hard link keeps the old file so a later failure can put it back.
                    backup = dest.with_name(f".{dest.name}.{os.getpid()}.bak")
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(backup)
                    try:
                        os.link(dest, backup)
                    except OSError:
                        backup = None
                out.commit()
                done.append((dest, existed, backup))
                backup = None
        except BaseException as exc:
            err = self._write_error(exc) if isinstance(exc, OSError) else None
            if backup is not None:  # the rename that failed left its destination as it was
                with contextlib.suppress(OSError):
                    os.remove(backup)
            for dest, existed, old in reversed(done):
                with contextlib.suppress(OSError):
                    if old is not None:
                        os.replace(old, dest)
                    elif not existed:
                        os.remove(dest)
            self._current = None
            self.discard()
            if err is not None:
                raise err from None
            raise
        for _, _, backup in done:
            if backup is not None:
                with contextlib.suppress(OSError):
                    os.remove(backup)
        self._current = None
        self.committed = list(self._staged)
        self._staged.clear()
        self._written.clear()
        for d in sorted(self._made_dirs, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                d.rmdir()  # a folder made for a dropped reservation only (rmdir needs it empty)
        self._made_dirs.clear()
        return self.committed

    def discard(self) -> None:
        """Remove every staged file and the folders created for them."""
        for out in self._staged.values():
            out.discard()
        self._staged.clear()
        self._written.clear()
        for d in sorted(self._made_dirs, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                d.rmdir()  # only if empty: never removes anything else
        self._made_dirs.clear()

    def _write_error(self, exc: OSError) -> OutputWriteError:
        if self._current is not None:
            where = str(self._current)
        else:  # raised outside write()/commit(): name every output of the set
            where = ", ".join(str(p) for p in self._staged) or str(exc.filename)
        return OutputWriteError(f"{where}: cannot write output ({exc.strerror or exc}); nothing was written")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
            return False
        if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
            err = self._write_error(exc)
            self.discard()
            raise err from None
        self.discard()
        return False


def output_set(outputs: OutputSet | None):
    """Context for a writer that may join a caller's :class:`OutputSet`.

    With ``outputs`` given, its files are staged there and committed by the
    caller; with ``None`` a new set is committed when the block ends.
    """
    return contextlib.nullcontext(outputs) if outputs is not None else OutputSet()
