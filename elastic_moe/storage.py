"""fsspec options that bound every request to a checkpoint's object storage.

A checkpoint save that waits on storage forever stalls the run: the next save waits for it, and
so does leaving a process group. s3fs (aiobotocore over aiohttp) times out connecting and reading
a response, but not *sending*: a PUT to a server that stopped reading (a paused or overloaded
process, a full TCP window) blocks until the server goes away, which may be never. The options
here give every S3 request a total deadline, so a save against a dead or hung server fails in
bounded time: about ``5 * attempts * timeout_s`` (botocore's attempts, each retried up to 5 times
by s3fs itself). Local paths fail at once (ENOSPC, EROFS, ...) and need nothing.

It also lists a checkpoint root's step directories and which are committed, without torch (the
coordinator, which never loads it, picks a rollback's checkpoint from that list).
"""

from __future__ import annotations

import functools
import re
from typing import Any

import fsspec

__all__ = ["COMMIT_FILE", "committed_in", "committed_steps", "step_dirs", "storage_options"]

COMMIT_FILE = "COMMITTED"  # written last into a step's directory: the save's commit point
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dirs(fs: Any, base: str) -> dict[int, str]:
    """The step directories under ``base`` on ``fs``, committed or not, by step."""
    if not fs.exists(base):
        return {}
    out = {}
    for entry in fs.ls(base, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if m := _STEP_DIR.match(name):
            out[int(m[1])] = entry
    return out


def committed_in(fs: Any, base: str) -> list[int]:
    """Steps with a committed checkpoint under ``base`` on ``fs``, ascending."""
    return sorted(step for step, path in step_dirs(fs, base).items()
                  if fs.exists(f"{path}/{COMMIT_FILE}"))


def committed_steps(root: str, options: dict[str, Any] | None = None) -> list[int]:
    """Steps with a committed checkpoint under ``root`` (a path or URL), ascending."""
    return committed_in(*fsspec.core.url_to_fs(root, **(options or {})))


def storage_options(url: str, timeout_s: float, attempts: int) -> dict[str, Any]:
    """The ``fsspec.url_to_fs(url, **options)`` options for a checkpoint root ``url``: a total
    deadline of ``timeout_s`` per request and ``attempts`` tries (S3); none for other protocols,
    whose clients keep their own timeouts."""
    protocol = fsspec.core.split_protocol(url)[0]
    if protocol not in ("s3", "s3a"):
        return {}
    return {"config_kwargs": {
        "connect_timeout": timeout_s, "read_timeout": timeout_s,
        "retries": {"total_max_attempts": attempts, "mode": "standard"},
        "http_session_cls": _deadline_session(timeout_s)}}


@functools.cache
def _deadline_session(timeout_s: float) -> type:
    """aiobotocore's HTTP session with aiohttp's ``total`` timeout set too (it sets only the
    connect and read ones). One class per value: fsspec caches filesystems by their options."""
    import aiohttp
    from aiobotocore.httpsession import AIOHTTPSession

    class DeadlineSession(AIOHTTPSession):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=timeout_s,
                                                  sock_read=timeout_s)

    DeadlineSession.__qualname__ = DeadlineSession.__name__ = f"DeadlineSession_{timeout_s:g}s"
    return DeadlineSession
