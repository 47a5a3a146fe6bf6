"""A job's results on disk, and stored artefacts that are verified before they are reused.

A job folder holds ``config.yaml``, ``predictions.jsonl``, any extra files of the job (plots, tables)
and, last, ``metrics.json``. `save` writes every file to a temporary file (fsync) in the same folder
first, then renames them into place, ``metrics.json`` last: its presence marks a finished job.
``metrics.json`` records the sha256 of every other file of the job (``"files"``) and a checksum of its
own content (``"checksum"``). `load_done` trusts a job only when all of it verifies; anything else
(a truncated, garbled or edited file, a missing key, another config) means "not done": the job is run
again, with a one-line note through the ``lshe`` logger. docs/results.md describes the schema.

`job_lock` serialises the processes that would compute the same job (two sweeps into one folder):
the second waits, then finds the job done. A killed process's lock is released by the kernel.

`store_json` / `load_json` keep a cached JSON artefact (the full-cache reference) with the fingerprint
of what determines it and a checksum of its content; `file_digest` / `weights_fingerprint` give the
content hashes to build such a fingerprint from (cached by path, size, mtime and inode).

Writes that fail (disk full, read-only folder) raise `ResultsError`, an OSError whose message is one
line naming the path and the cause, and leave no temporary file behind.
"""

from __future__ import annotations

import contextlib
import errno as errno_codes
import fcntl
import hashlib
import json
import logging
import os
import platform
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from importlib import metadata
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lshe.assets import sha256_file

log = logging.getLogger("lshe")

METRICS = "metrics.json"
PREDICTIONS = "predictions.jsonl"
CONFIG = "config.yaml"
LOCK = ".job.lock"
"""The lock file of a job folder (`job_lock`); hidden, never listed in ``files``."""

REQUIRED = ("config_hash", "files", "checksum")
"""Keys a finished job's metrics.json must hold (besides what the runner records)."""

STORE_FORMAT = 1
"""Layout version of `store_json` files; a file of another version does not verify."""

# Keys that change how a job is run or logged, not what it computes: left out of the config hash.
NOT_HASHED = ("hydra", "logger", "skip_done", "threads", "reference_dir")


class ResultsError(OSError):
    """Results could not be written: ``str()`` is one line, "cannot write results to PATH: CAUSE".

    Built like an OSError: ``ResultsError(errno, strerror, path)`` (so it pickles); `errno` says why.
    """

    def __str__(self) -> str:
        return f"cannot write results to {self.filename}: {self.strerror}"


def _write_error(path: str | Path, err: OSError) -> ResultsError:
    if isinstance(err, ResultsError):
        return err
    cause = err.strerror or str(err) or type(err).__name__
    return ResultsError(err.errno or errno_codes.EIO, " ".join(cause.split()), str(path))


# ------------------------------------------------------------------------------------ plain writes
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _stage(path: Path, data: bytes) -> Path:
    """``data`` in a fsynced temporary file next to ``path`` (``.<name>.<random>.tmp``), mode 0666 - umask."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return Path(tmp)


def _fsync_dir(folder: Path) -> None:
    """Make renames in ``folder`` durable (best effort: not every file system allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename (all or nothing).

    The file gets the usual permissions (0666 less the umask), not the temporary file's 0600.
    Raises `ResultsError` (one line) when the folder cannot be written; the old file, if any, is kept.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _stage(path, data)
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(err, OSError):
            raise _write_error(path, err) from err
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`atomic_write_bytes` of ``text`` in UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


# ---------------------------------------------------------------------------------- JSON, hashing
def to_json(obj) -> str:
    """Indented JSON (numpy/torch scalars, paths, sets and tuples converted), newline-terminated."""
    return json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"


def _json_default(obj):
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _plain(obj):
    """``obj`` as it reads back from its JSON (tuples -> lists, int keys -> str keys, scalars -> numbers)."""
    return json.loads(json.dumps(obj, default=_json_default))


def canonical_json(obj) -> str:
    """The JSON text checksums are taken of: sorted keys, no spaces, of ``obj`` as it reads back."""
    return json.dumps(_plain(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def json_checksum(obj) -> str:
    """sha256 (hex) of `canonical_json` of ``obj``: equal for ``obj`` and for its JSON read back."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    return sha256_file(path)


def config_hash(cfg: DictConfig) -> str:
    """sha256 (16 hex digits) of the resolved config without the keys in `NOT_HASHED`."""
    container = OmegaConf.to_container(cfg, resolve=True)
    for key in NOT_HASHED:
        container.pop(key, None)  # type: ignore[union-attr]
    text = json.dumps(container, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -------------------------------------------------------------------------------------- job results
def _job_file_name(output_dir: Path, entry: str | Path) -> str:
    """The name (relative POSIX path) under which an extra file is listed in ``files``."""
    path = Path(entry)
    path = path if path.is_absolute() else output_dir / path
    try:
        name = path.resolve().relative_to(output_dir.resolve()).as_posix()
    except ValueError:
        raise ValueError(f"extra file {entry} is not inside the job folder {output_dir}") from None
    if name in (METRICS, LOCK, "."):
        raise ValueError(f"extra file {entry}: {name} cannot be listed as an extra file of a job")
    return name


def save(
    output_dir: str | Path,
    cfg: DictConfig | Mapping,
    metrics: dict,
    predictions: list[dict],
    extra_files: Iterable[str | Path | tuple[str, bytes | str]] = (),
) -> Path:
    """Write a job's results: config.yaml, predictions.jsonl, extra files, and last metrics.json.

    ``extra_files`` entries are either a path of a file the job already wrote inside ``output_dir``
    (a plot: it is hashed as it is on disk) or a ``(name, content)`` pair that is written here.
    ``metrics`` gets (in place, so that what the runner returns matches the file) ``"files"``: the
    sha256 of each file of the job by name, and ``"checksum"``: `json_checksum` of the metrics
    without that key. Returns the path of metrics.json.

    Everything is serialised and staged in fsynced temporary files before the folder changes; then
    an older metrics.json is removed and the files are renamed into place, metrics.json last. A write
    that fails raises `ResultsError` and removes the temporary files: the folder then holds either
    nothing new or files that no metrics.json vouches for, which `load_done` reports as not done.
    """
    output_dir = Path(output_dir)
    contents: dict[str, bytes] = {
        CONFIG: OmegaConf.to_yaml(cfg, resolve=True).encode("utf-8"),
        PREDICTIONS: "".join(json.dumps(row, default=_json_default) + "\n" for row in predictions).encode(
            "utf-8"
        ),
    }
    in_place: list[str] = []
    for entry in extra_files:
        if isinstance(entry, tuple):
            name, content = entry
            name = _job_file_name(output_dir, name)
            if name in contents:
                raise ValueError(f"extra file {name} is listed twice or clashes with a file save writes")
            contents[name] = content.encode("utf-8") if isinstance(content, str) else bytes(content)
        else:
            name = _job_file_name(output_dir, entry)
            if name in contents or name in in_place:
                raise ValueError(f"extra file {name} is listed twice or clashes with a file save writes")
            in_place.append(name)
    files = {name: _sha256_bytes(data) for name, data in contents.items()}
    for name in in_place:
        path = output_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"extra file {name} of the job does not exist in {output_dir}")
        files[name] = _sha256_file(path)
    metrics.pop("checksum", None)
    metrics["files"] = files
    metrics["checksum"] = json_checksum({k: v for k, v in metrics.items() if k != "checksum"})
    contents[METRICS] = to_json(metrics).encode("utf-8")  # last key of the dict: renamed last, too

    staged: list[tuple[Path, Path]] = []
    current = output_dir
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        for name, data in contents.items():
            current = output_dir / name
            current.parent.mkdir(parents=True, exist_ok=True)
            staged.append((_stage(current, data), current))
        current = output_dir / METRICS
        current.unlink(missing_ok=True)  # the folder no longer claims a finished job until the end
        while staged:
            tmp, current = staged[0]
            os.replace(tmp, current)
            staged.pop(0)
    except BaseException as err:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(err, OSError):
            raise _write_error(current, err) from err
        raise
    _fsync_dir(output_dir)
    return output_dir / METRICS


def check_job(output_dir: str | Path, cfg_hash: str | None = None) -> tuple[dict | None, str | None]:
    """Verify the results in ``output_dir``: ``(metrics, None)`` when they verify, else ``(None, why)``.

    ``why`` is one line; it is None when there is no metrics.json at all (a job never finished).
    Verified: metrics.json parses to an object with the `REQUIRED` keys, its checksum matches, its
    config_hash equals ``cfg_hash`` (unless ``cfg_hash`` is None), and every file in ``files`` exists
    with the recorded sha256. Never raises for damaged files.
    """
    output_dir = Path(output_dir)
    if not (output_dir / METRICS).exists():
        return None, None
    metrics, why = _read_json_object(output_dir / METRICS)
    if why is not None:
        return None, f"{METRICS}: {why}"
    missing = [key for key in REQUIRED if key not in metrics]
    if missing:
        return None, f"{METRICS} lacks {', '.join(missing)} (written by an older lshe or edited)"
    stored = metrics["checksum"]
    if not isinstance(stored, str) or stored != json_checksum(
        {k: v for k, v in metrics.items() if k != "checksum"}
    ):
        return None, f"{METRICS} was edited or damaged (its checksum does not match its content)"
    if cfg_hash is not None and metrics["config_hash"] != cfg_hash:
        return None, f"{METRICS} is of another config (config_hash {metrics['config_hash']}, now {cfg_hash})"
    files = metrics["files"]
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        return None, f"{METRICS}: files is not a mapping of names to sha256"
    for name, digest in sorted(files.items()):
        file = output_dir / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return None, f"{METRICS} lists a file outside the job folder: {name}"
        try:
            actual = _sha256_file(file)
        except FileNotFoundError:
            return None, f"{name} is missing"
        except OSError as err:
            return None, f"cannot read {name} ({_reason(err)})"
        if actual != digest:
            return None, f"{name} was changed or truncated (sha256 differs from {METRICS})"
    return metrics, None


def load_done(output_dir: str | Path, cfg_hash: str) -> dict | None:
    """The metrics of a finished job in ``output_dir`` with the same config hash, else None.

    "Finished" means `check_job` verifies everything. When a metrics.json exists but does not
    verify, a one-line warning on the ``lshe`` logger says why; the caller runs the job again.
    """
    metrics, why = check_job(output_dir, cfg_hash)
    if why is not None:
        log.warning("%s: results do not verify (%s): the job will be re-run", output_dir, why)
    return metrics


def _reason(err: BaseException) -> str:
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return " ".join(text.split())


def _kind(value) -> str:
    if value is None:
        return "null"
    return {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__
    )


# -------------------------------------------------------------------------------------------- locks
_held: dict[tuple[str, int], int] = {}  # (lock file, thread) -> depth, so a lock is re-entrant
_held_guard = threading.Lock()


@contextlib.contextmanager
def _flock(lock_path: Path, what: str, timeout_s: float | None) -> Iterator[bool]:
    """Hold an exclusive flock on ``lock_path``; yields True when newly taken, False when re-entered."""
    key = (os.path.realpath(lock_path), threading.get_ident())
    with _held_guard:
        depth = _held.get(key, 0)
        if depth:
            _held[key] = depth + 1
    if depth:
        try:
            yield False
        finally:
            with _held_guard:
                _held[key] -= 1
        return
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    except OSError as err:
        raise _write_error(lock_path.parent, err) from err
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            log.info("waiting for %s, which holds the lock of %s", holder, what)
            _wait_for_lock(fd, lock_path, what, timeout_s)
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        with _held_guard:
            _held[key] = 1
        try:
            yield True
        finally:
            with _held_guard:
                del _held[key]
    finally:
        os.close(fd)  # releases the flock


def _wait_for_lock(fd: int, lock_path: Path, what: str, timeout_s: float | None) -> None:
    if timeout_s is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{what} stayed locked for {timeout_s:g} s ({lock_path})") from None
            time.sleep(0.1)


def clean_temp_files(folder: str | Path, name: str | None = None) -> list[Path]:
    """Remove leftover temporary files of killed writes (``.*.tmp``, or ``.<name>.*.tmp``) in ``folder``.

    Only safe while no other process writes there: call it under the folder's lock (`job_lock` and
    `file_lock` do). Returns the removed paths.
    """
    removed = []
    pattern = f".{name}.*tmp" if name else ".*.tmp"
    for path in Path(folder).glob(pattern):
        if path.is_file() and path.name.endswith(".tmp"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    if removed:
        log.info("removed %d leftover temporary file(s) of an interrupted write in %s", len(removed), folder)
    return removed


@contextlib.contextmanager
def job_lock(output_dir: str | Path, timeout_s: float | None = None) -> Iterator[Path]:
    """Hold the lock of a job folder while checking and computing the job; yields the folder.

    Policy: try to take the lock at once; when another process holds it, note "waiting for pid N"
    and wait (indefinitely, or up to ``timeout_s`` then TimeoutError): that process is computing this
    job, and `load_done` afterwards finds it finished. The lock is ``fcntl.flock`` on
    ``<output_dir>/.job.lock``: the kernel releases it when its holder exits or is killed, so a stale
    lock is simply taken over. It is re-entrant within one thread. Once taken, leftover ``.*.tmp``
    files of killed writes in the folder are removed. A folder that cannot be written raises
    `ResultsError` here, before anything is computed. flock needs a local file system or NFSv4.
    """
    output_dir = Path(output_dir)
    with _flock(output_dir / LOCK, f"job {output_dir}", timeout_s) as first:
        if first:
            clean_temp_files(output_dir)
        yield output_dir


@contextlib.contextmanager
def file_lock(path: str | Path, timeout_s: float | None = None) -> Iterator[Path]:
    """`job_lock` for one stored file (the full-cache reference): ``.<name>.lock`` next to it.

    Use it around "`load_json`, else compute and `store_json`" so that concurrent jobs compute a
    shared artefact once. Leftover temporary files of ``path`` are removed when the lock is taken.
    """
    path = Path(path)
    with _flock(path.with_name(f".{path.name}.lock"), str(path), timeout_s) as first:
        if first:
            clean_temp_files(path.parent, path.name)
        yield path


# ------------------------------------------------------------------------ verified cached artefacts
def store_json(path: str | Path, payload: dict, fingerprint: dict) -> Path:
    """Store ``payload`` with the ``fingerprint`` of what determines it and a checksum of its content.

    The file is ``{"format", "fingerprint", "checksum", "payload"}`` (atomic write; `ResultsError` on
    failure). ``fingerprint`` should hold everything the payload depends on: content hashes of the
    model files (`weights_fingerprint`), prompts, generation settings, library versions.
    """
    if not isinstance(payload, dict):
        raise TypeError(f"store_json stores a dict payload, got {type(payload).__name__}")
    if not isinstance(fingerprint, dict):
        raise TypeError(f"store_json needs a dict fingerprint, got {type(fingerprint).__name__}")
    document = {
        "format": STORE_FORMAT,
        "fingerprint": _plain(fingerprint),
        "checksum": json_checksum(payload),
        "payload": payload,
    }
    return atomic_write_text(path, json.dumps(document, default=_json_default) + "\n")


def load_json(path: str | Path, fingerprint: dict, what: str = "reference") -> dict | None:
    """The payload `store_json` stored at ``path`` for this ``fingerprint``, or None.

    None (and a one-line note "<what> <path> does not verify (<why>): recomputing" on the ``lshe``
    logger; INFO when the file does not exist yet, WARNING otherwise) when the file is missing,
    unreadable, not JSON, not an object (``[]``), lacks keys, is of another format, was stored for
    another fingerprint, or its payload does not match its checksum (an edit, even of the same length).
    """
    payload, why = _check_stored(Path(path), fingerprint)
    if why is not None:
        level = logging.INFO if why == "no such file" else logging.WARNING
        log.log(level, "%s %s does not verify (%s): recomputing", what, path, why)
    return payload


def _read_json_object(path: Path) -> tuple[dict | None, str | None]:
    """(the JSON object in ``path``, None), or (None, why in a few words); never raises."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, "no such file"
    except (OSError, UnicodeDecodeError) as err:
        return None, f"cannot read it: {_reason(err)}"
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        return None, f"not valid JSON: {err.msg} at line {err.lineno}"
    except RecursionError:
        return None, "not valid JSON: nested too deeply"
    if not isinstance(document, dict):
        return None, f"holds {_kind(document)}, not an object"
    return document, None


def _check_stored(path: Path, fingerprint: dict) -> tuple[dict | None, str | None]:
    document, why = _read_json_object(path)
    if why is not None:
        return None, why
    missing = [key for key in ("format", "fingerprint", "checksum", "payload") if key not in document]
    if missing:
        return None, f"lacks {', '.join(missing)}"
    if document["format"] != STORE_FORMAT:
        return None, f"format {document['format']!r}, expected {STORE_FORMAT}"
    stored, wanted = document["fingerprint"], _plain(fingerprint)
    if stored != wanted:
        if isinstance(stored, dict):
            keys = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
            return None, f"made for another {', '.join(map(str, keys))}"
        return None, "made for another fingerprint"
    payload = document["payload"]
    if not isinstance(payload, dict):
        return None, f"its payload is {_kind(payload)}, not an object"
    if document["checksum"] != json_checksum(payload):
        return None, "its content was changed (checksum mismatch)"
    return payload, None


# ---------------------------------------------------------------------------------- file digests
DIGEST_CACHE = "file_digests.json"
"""Name of the digest cache inside `lshe.assets.cache_dir()`."""

_SETTLED_NS = 2_000_000_000  # files modified less than 2 s ago are hashed but not cached (coarse mtimes)


def _digest_cache_path() -> Path:
    from lshe.assets import cache_dir

    return cache_dir() / DIGEST_CACHE


def file_digests(paths: Iterable[str | Path]) -> dict[Path, str]:
    """sha256 (hex) of each file's content, by the path given; see `file_digest`."""
    paths = [Path(p) for p in paths]
    cache_path = _digest_cache_path()
    entries = _read_digest_cache(cache_path)
    out: dict[Path, str] = {}
    added = {}
    now = time.time_ns()
    for path in paths:
        real = os.path.realpath(path)
        st = os.stat(real)  # FileNotFoundError names the path
        key = [st.st_size, st.st_mtime_ns, st.st_ino]
        entry = entries.get(real)
        if isinstance(entry, dict) and entry.get("key") == key and isinstance(entry.get("sha256"), str):
            out[path] = entry["sha256"]
            continue
        out[path] = _sha256_file(Path(real))
        if now - st.st_mtime_ns > _SETTLED_NS:
            added[real] = {"key": key, "sha256": out[path]}
    if added:
        _update_digest_cache(cache_path, added)
    return out


def file_digest(path: str | Path) -> str:
    """sha256 (hex) of a file's content, cached by (real path, size, mtime_ns, inode).

    The cache is `DIGEST_CACHE` in ``lshe.assets.cache_dir()`` (``$LSHE_CACHE``). A file modified in
    the last 2 s is hashed but not cached, so that an edit within one mtime tick (mtimes are coarse)
    is not hidden by the cache; an edit that keeps the size and restores the mtime on the same inode
    (``touch -d``) is the one change the cache cannot see. A cache that cannot be read or written is
    ignored (the digest is computed).
    """
    return file_digests([path])[Path(path)]


def _read_digest_cache(cache_path: Path) -> dict:
    try:
        data = json.loads(cache_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    entries = data.get("entries") if isinstance(data, dict) else None
    return entries if isinstance(entries, dict) else {}


def _update_digest_cache(cache_path: Path, added: dict) -> None:
    try:
        with file_lock(cache_path, timeout_s=30):
            entries = _read_digest_cache(cache_path)
            entries.update(added)
            entries = {p: e for p, e in entries.items() if os.path.exists(p)}  # forget deleted files
            atomic_write_text(cache_path, json.dumps({"format": 1, "entries": entries}, indent=1) + "\n")
    except (OSError, TimeoutError) as err:
        log.debug("file digest cache %s not updated: %s", cache_path, err)


_NOT_MODEL_FILES = ("README", "LICENSE", "NOTICE", "USE_POLICY")


def weights_fingerprint(model_dir: str | Path) -> dict:
    """Content hashes of a model folder: ``{"files": {relative path: sha256}, "sha256": combined}``.

    Every file below ``model_dir`` counts (weights, config, generation config, tokenizer files,
    custom code), except hidden files and folders and documentation (``*.md``, README, LICENSE,
    NOTICE, USE_POLICY). Symlinks are followed (Hugging Face cache snapshots). The location of the
    folder is not part of it: the same files elsewhere give the same fingerprint.
    """
    root = Path(model_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"model folder {root} does not exist or is not a folder")
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or name.endswith(".md") or name.upper().startswith(_NOT_MODEL_FILES):
                continue
            path = Path(dirpath) / name
            if path.is_file():
                found.append(path)
    if not found:
        raise ValueError(f"model folder {root} holds no model files")
    digests = file_digests(found)
    files = {path.relative_to(root).as_posix(): digests[path] for path in found}
    files = dict(sorted(files.items()))
    return {"files": files, "sha256": json_checksum(files)}


# ----------------------------------------------------------------------------------------- versions
def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def git_state(repo: str | Path | None = None) -> dict:
    """The commit of the lshe checkout and whether it had uncommitted changes (None outside git)."""
    repo = Path(repo) if repo else Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        status = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def versions() -> dict:
    """Versions of what produced a result: lshe (and its git commit), Python, torch, transformers, Hydra."""
    import torch

    git = git_state()
    return {
        "lshe": _version("lshe"),
        "git_commit": git["commit"],
        "git_dirty": git["dirty"],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": _version("transformers"),
        "hydra": _version("hydra-core"),
        "platform": platform.platform(),
    }
