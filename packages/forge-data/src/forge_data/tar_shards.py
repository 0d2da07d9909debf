"""Complete samples of one webdataset tar shard, or a clear error when the shard is damaged.

A webdataset sample is the run of tar members sharing a key (``key.txt``, ``key.png`` ...; the
key is the member path up to the first dot of its file name, as webdataset's ``base_plus_ext``;
Breuel et al., github.com/webdataset). webdataset's own ``tarfile_to_samples`` cannot tell a
shard cut exactly between two members from a complete one: Python's :mod:`tarfile` reads a
missing header as the end of the archive, so the sample being assembled when the bytes ran out
is yielded without its later files (a caption without its image). :func:`tar_samples` instead
requires the end-of-archive marker that every tar writer puts after the last member (zero
blocks, POSIX.1-1988 ustar): a shard whose bytes end before it raises :class:`ShardError`, as
does a member cut short, a bad header or a duplicate file in a sample. A sample is yielded only
once the next sample's first member (or the end marker) proves it complete, so the sample being
assembled when a shard fails is never yielded. The check is on the tar stream itself, so it
holds for local files and remote streams (``http(s)://``, ``pipe:``, fsspec) alike; a stream
cut after its first zero block, before the second, reads as complete (all its members are).
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from typing import Any

__all__ = ["ShardError", "expand_shard_urls", "tar_samples"]

_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta


def expand_shard_urls(pattern: str) -> list[str]:
    """The shard URLs of a brace pattern (``shard-{000..099}.tar``, ``{a,b}.tar``; several
    patterns joined by ``::``), as webdataset expands them; a plain path is itself."""
    from webdataset.shardlists import expand_urls

    return list(expand_urls(pattern))


class ShardError(ValueError):
    """A tar shard is truncated or malformed."""


class _EndlessTarInfo(tarfile.TarInfo):
    """Tells "the bytes ran out where a header should be" from the end-of-archive zero block,
    which :mod:`tarfile` reads alike as the end of the archive."""

    @classmethod
    def fromtarfile(cls, tarfile_):
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.EmptyHeaderError:
            if tarfile_.offset == 0:
                raise ShardError("the file is empty") from None
            raise ShardError(
                f"the data ends at byte {tarfile_.offset} without the tar end-of-archive marker "
                "(the shard was cut short, e.g. by an interrupted copy or download)"
            ) from None
        except tarfile.TruncatedHeaderError:
            raise ShardError(
                f"the data ends inside the tar header at byte {tarfile_.offset} (the shard was "
                "cut short)"
            ) from None


def tar_samples(url: str) -> Iterator[dict[str, Any]]:
    """The complete samples of the shard at ``url`` (webdataset's ``gopen``: local paths,
    ``http(s)://``, ``pipe:``, fsspec URLs), each ``{"__key__", "__url__", ext: bytes, ...}``
    with lower-case extensions; raises :class:`ShardError` (or the stream's ``OSError``) when
    the shard is damaged, having yielded only the samples before the damage."""
    from webdataset.gopen import gopen

    try:
        stream = gopen(url, "rb")
    except OSError as err:
        raise ShardError(f"cannot open it: {type(err).__name__}: {err}") from err
    complete = False
    try:
        yield from _samples(stream, url)
        complete = True
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ShardError(f"{type(err).__name__}: {err}") from err
    finally:
        try:
            stream.close()  # a pipe: stream raises here on a non-zero exit status
        except OSError as err:
            if complete:  # not when the reader stopped early or the shard already failed
                raise ShardError(f"closing the stream failed: {err}") from err


def _samples(stream, url: str) -> Iterator[dict[str, Any]]:
    current: dict[str, Any] | None = None
    with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndlessTarInfo) as tar:
        for member in tar:
            if not member.isreg() or _META.match(member.name):
                continue
            data = tar.extractfile(member).read()
            tar.members = []  # a stream can be long: keep no member list
            match = _KEY.match(member.name)
            if match is None:
                continue
            key, ext = match.group(1), match.group(2).lower()
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": url}
            if ext in current:
                raise ShardError(f"sample {key!r} holds {member.name} twice")
            current[ext] = data
    if current is not None:
        yield current
