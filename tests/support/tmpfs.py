"""A small real file system for disk-full tests: a tmpfs mounted for one test and unmounted after it."""

import contextlib
import subprocess

import pytest


@contextlib.contextmanager
def mounted_tmpfs(mnt, size: str):
    """Mount a tmpfs of ``size`` (e.g. ``"8m"``) on the existing empty directory ``mnt`` for the block;
    skips the test where mounting is not permitted (not root, no CAP_SYS_ADMIN). Unmounted in finally."""
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mnt)],
                           capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30, check=False)
