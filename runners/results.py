"""A job's results on disk: ``config.yaml``, ``predictions.jsonl`` and, last, ``metrics.json``.

Every file is written to a temporary file in the same folder and renamed into place, so a crash never
leaves a half-written file, and ``metrics.json`` is renamed last: its presence means the job finished.
``skip_done`` uses that: a job whose folder already holds a ``metrics.json`` with the same
``config_hash`` is not run again, which is how an interrupted sweep resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

METRICS = "metrics.json"
PREDICTIONS = "predictions.jsonl"
CONFIG = "config.yaml"

# Keys that change how a job is run or logged, not what it computes: left out of the config hash.
NOT_HASHED = ("hydra", "logger", "skip_done", "threads", "reference_dir")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename (all or nothing).

    The file gets the usual permissions (0666 less the umask), not the temporary file's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`atomic_write_bytes` of ``text`` in UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def to_json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"


def _json_default(obj):
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def config_hash(cfg: DictConfig) -> str:
    """sha256 (16 hex digits) of the resolved config without the keys in `NOT_HASHED`."""
    container = OmegaConf.to_container(cfg, resolve=True)
    for key in NOT_HASHED:
        container.pop(key, None)  # type: ignore[union-attr]
    text = json.dumps(container, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_done(output_dir: str | Path, cfg_hash: str) -> dict | None:
    """The metrics of a finished job in ``output_dir`` with the same config hash, else None."""
    path = Path(output_dir) / METRICS
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return metrics if metrics.get("config_hash") == cfg_hash else None


def save(output_dir: str | Path, cfg: DictConfig, metrics: dict, predictions: list[dict]) -> Path:
    """Write config.yaml, predictions.jsonl, then metrics.json (the marker of a finished job)."""
    output_dir = Path(output_dir)
    atomic_write_text(output_dir / CONFIG, OmegaConf.to_yaml(cfg, resolve=True))
    lines = "".join(json.dumps(row, default=_json_default) + "\n" for row in predictions)
    atomic_write_text(output_dir / PREDICTIONS, lines)
    return atomic_write_text(output_dir / METRICS, to_json(metrics))


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
