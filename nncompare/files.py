"""Whole-or-nothing files: outputs checked before any work, inputs read without blocking and size-bounded, strict
JSON, atomic writes, and the journal of finished cells that --resume starts from."""
from __future__ import annotations

import csv
import fcntl
import io
import json
import math
import os
import stat
import tempfile
from pathlib import Path

from .errors import UsageError


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def short(text: str, limit: int = 80) -> str:
    """`text` as repr, cut to about `limit` characters: an error line must stay one readable line."""
    r = repr(text)
    return r if len(r) <= limit else r[:limit - 4] + "...'"


def check_target(path: str, what: str = "output") -> None:
    """Refuse, before any work, a path a results file must not replace: a link, a folder, a device node..."""
    if not path.strip():
        raise UsageError(f"{what} path is empty")
    if "\0" in path:
        raise UsageError(f"{what} path {short(path)} holds a NUL byte")
    if os.path.islink(path):
        raise UsageError(f"will not write over {short(path)}: it is a symbolic link")
    if os.path.isdir(path) or path.endswith(os.sep):
        raise UsageError(f"{what} path {short(path)} is a directory")
    if os.path.lexists(path) and not stat.S_ISREG(os.lstat(path).st_mode):
        raise UsageError(f"will not write over {short(path)}: it is not a regular file")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UsageError(f"will not write over {short(path)}: it is read-only")
    if os.path.exists(path) and _locked(path):
        raise UsageError(f"another run is writing these results: a running compare.py holds {short(path)}; wait "
                         "for it to finish, or write to another file")
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {short(path)}: folder {short(parent)} does not exist or is not writable")
    try:
        name_max = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    name = len(os.fsencode(os.path.basename(path)))
    if name > name_max:
        raise UsageError(f"cannot write {short(path)} ({what}): its file name is {name} bytes, longer than the "
                         f"{name_max} this file system allows")
    try:  # the folder really takes a new file (access() says yes for root on /proc, a read-only mount...)
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)[:64]}.")
    except OSError as e:
        raise UsageError(f"cannot write {short(path)}: {e.strerror or e} in folder {short(parent)}") from None
    os.close(fd)
    os.unlink(tmp)


def _locked(path: str) -> bool:
    """Whether another process holds a lock on the regular file `path` (a running sweep's journal)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def open_input(path: str, what: str) -> int:
    """A descriptor of the regular file `path`, opened without blocking: a FIFO, a device or a folder given as an
    input is refused at once (reading a FIFO would wait forever, /dev/zero never ends)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise UsageError(f"cannot read {what} {short(path)}: {e.strerror or e}") from None
    except ValueError:  # a NUL byte in the path
        raise UsageError(f"cannot read {what} {short(path)}: the path holds a NUL byte") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UsageError(f"{what} {short(path)} is not a regular file")
    return fd


def check_input(path: str, what: str) -> None:
    """Refuse a non-regular input file (a FIFO, a device) before anything opens it the blocking way."""
    os.close(open_input(path, what))


MAX_RESULTS_BYTES = 256 * 2 ** 20  # a results file of thousands of rows is a few MiB
MAX_INT_DIGITS = 20  # every integer a row holds fits in 64 bits


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits")
    return int(text)


def _unique_keys(pairs: list[tuple]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) < len(keys):  # which value counts would be a guess: a row written twice over, or forged
        twice = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"duplicate key {twice[:40]!r} in one object")
    return dict(pairs)


def parse_json(text: str):
    """Strict-enough JSON for files from elsewhere: a ValueError (never a RecursionError or an integer too large
    for a float) for what no results file holds, duplicate keys included."""
    try:
        return json.loads(text, parse_int=_bounded_int, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def read_results(path: str, what: str = "results file") -> object:
    """A results file's JSON (UTF-8, a BOM accepted), size-bounded; every problem is one UsageError."""
    with os.fdopen(open_input(path, what), "rb") as f:
        try:
            raw = f.read(MAX_RESULTS_BYTES + 1)
        except OSError as e:
            raise UsageError(f"cannot read {what} {short(path)}: {e.strerror or e}") from None
    if len(raw) > MAX_RESULTS_BYTES:
        raise UsageError(f"{short(path)} is larger than {MAX_RESULTS_BYTES // 2 ** 20} MiB: not a {what}")
    try:
        return parse_json(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise UsageError(f"{short(path)} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    except ValueError as e:
        raise UsageError(f"{short(path)} is not JSON: {str(e).splitlines()[0][:120]}") from None


def check_outputs(outputs: dict[str, str | None], inputs: list[str] = ()) -> None:
    """Every output writable, none a link or special file, no two the same file, none an input file."""
    seen: dict[str, str] = {}
    for path in inputs:
        if os.path.exists(path):
            seen[os.path.realpath(path)] = f"the input {path!r}"
    for option, path in outputs.items():
        if path is None:
            continue
        check_target(path, option)
        real = os.path.realpath(path)
        if real in seen:
            raise UsageError(f"will not write over {path!r} ({option}): it is also {seen[real]}")
        seen[real] = f"the {option} output"


def check_plot(path: str | None) -> None:
    """matplotlib is installed and can write this file type: checked before any work."""
    if path is None:
        return
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError(f"--plot {path!r} needs matplotlib: pip install 'nncompare[plot]'") from None
    formats = Figure().canvas.get_supported_filetypes()
    ext = os.path.splitext(path)[1][1:].lower()
    if ext not in formats:
        raise UsageError(f"--plot {path!r}: unsupported file type {('.' + ext) if ext else '(no extension)'} "
                         f"(use one of {', '.join(sorted(formats))})")


def write_atomic(path: str, data: str | bytes) -> None:
    """Write a whole file or nothing: a temporary file in the same folder, then an atomic rename. Never replaces
    a link or a special file; a new file gets the umask's mode, a replaced one keeps its own."""
    target = Path(path)
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    else:
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"will not write over {path!r}: it is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
    # the temporary's name is cut short: a results name near the file system's limit must still get one
    fd, tmp = tempfile.mkstemp(dir=target.parent if str(target.parent) else ".", prefix=f".{target.name[:64]}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def finite(obj):
    """NaN and infinities as None, recursively: strict JSON has no NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def strict_json(obj, indent: int | None = 2) -> str:
    return json.dumps(finite(obj), indent=indent, allow_nan=False)


def rows_to_csv(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], (list, dict))))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()



# --- journal ---------------------------------------------------------------------------------------
class Journal:
    """Finished cells, one JSON line each, flushed and fsynced as they finish: what a crash, a lost node or a
    Ctrl-C leaves behind, and what --resume starts from. Held under an exclusive lock from open() until the
    process ends, so two runs never write one journal."""

    MAX_LINE = 16 * 2 ** 20  # a row is a few KiB: a longer line is not one

    def __init__(self, path: str):
        self.path = path
        self.fresh = True  # the first append truncates what an earlier run left (unless resuming)
        self._fd: int | None = None
        self._started = False

    def open(self) -> None:
        """Create or open the journal and lock it; a UsageError when another run holds it or it cannot be made."""
        flags = (os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
                 | getattr(os, "O_CLOEXEC", 0))
        for _ in range(20):
            try:
                fd = os.open(self.path, flags, 0o666)
            except OSError as e:
                raise UsageError(f"cannot create the journal {short(self.path)}: {e.strerror or e}") from None
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise UsageError(f"will not write over {short(self.path)}: it is not a regular file")
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise UsageError(f"another run is writing these results (it holds the journal "
                                     f"{short(self.path)}): wait for it to finish, or write to another file") from None
                try:  # the run that held the lock may have finished and deleted the file meanwhile
                    now = os.stat(self.path)
                    same = (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)
                except FileNotFoundError:
                    same = False
            except BaseException:
                os.close(fd)
                raise
            if same:
                self._fd = fd
                return
            os.close(fd)
        raise UsageError(f"cannot lock the journal {short(self.path)}: other runs keep replacing it")

    def read(self) -> dict[str, dict]:
        """{cell key: row} of every complete line (a line cut short by a crash, or corrupted, is ignored)."""
        if self._fd is not None:
            f = os.fdopen(os.dup(self._fd), "rb")
            f.seek(0)
        else:
            try:
                f = os.fdopen(open_input(self.path, "journal"), "rb")
            except UsageError:
                if not os.path.lexists(self.path):
                    return {}
                raise
        rows = {}
        with f:
            if os.fstat(f.fileno()).st_size > MAX_RESULTS_BYTES:
                raise UsageError(f"the journal {short(self.path)} is larger than {MAX_RESULTS_BYTES // 2 ** 20} MiB: "
                                 "not one this tool wrote")
            while line := f.readline(self.MAX_LINE):
                if not line.endswith(b"\n"):
                    while (more := f.readline(self.MAX_LINE)) and not more.endswith(b"\n"):
                        pass  # the rest of an overlong line
                    continue  # overlong, or the last line cut short by a crash
                try:
                    entry = parse_json(line.decode("utf-8"))
                except ValueError:  # corrupted, or bytes that are not UTF-8
                    continue
                if isinstance(entry, dict) and isinstance(entry.get("cell"), str) and isinstance(entry.get("row"), dict):
                    rows[entry["cell"]] = entry["row"]
        return rows

    def _start(self) -> None:
        """Before the first line: start afresh, or (resuming) drop a last line a crash cut short, which the next
        line would otherwise be glued onto and lost with."""
        if self.fresh:
            os.ftruncate(self._fd, 0)
            return
        size = end = os.fstat(self._fd).st_size
        if not size or os.pread(self._fd, 1, size - 1) == b"\n":
            return
        keep = 0
        while end > 0:
            start = max(0, end - (1 << 16))
            i = os.pread(self._fd, end - start, start).rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            end = start
        os.ftruncate(self._fd, keep)

    def append(self, key: str, row: dict) -> None:
        if self._fd is None:
            self.open()
        if not self._started:
            self._start()
            self._started = True
        data = memoryview((strict_json({"cell": key, "row": row}, indent=None) + "\n").encode("utf-8"))
        while data:
            data = data[os.write(self._fd, data):]
        os.fsync(self._fd)

    def close(self) -> None:
        """Release the lock; a journal nothing was ever written to is removed (it holds no finished cell)."""
        if self._fd is None:
            return
        try:
            if os.fstat(self._fd).st_size == 0:
                Path(self.path).unlink(missing_ok=True)
        except OSError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None

    def remove(self) -> None:
        Path(self.path).unlink(missing_ok=True)  # still under the lock
        self.close()
