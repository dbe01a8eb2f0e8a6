"""Names that arrive inside data (sample keys and member names from tar headers, shard paths listed in index.json,
the ledger or the manifest) are checked here before anything uses them. A shard or an output directory may come
from someone else; none of its names may steer a read, a write or a delete outside the directory it belongs to.

What passes is deliberately narrow: keys and member extensions are plain ASCII words, and a shard path is
`shards/NAME.tar` with one plain file name. Anything else is refused with `UnsafeName`, never cleaned up into
something that might name another sample.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from pipeline.core.errors import UserFacingError

# Keys the pipeline writes: `<16 hex>-<first>-<last>`, and `...-x` for cross pairs. No dots (WebDataset splits a
# member name at the first dot), no path separators, and not starting with "-" so a key is never read as an option.
_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,199}")
# What follows `KEY.` in a member name: "json", "mp4", "ref0.png", "faces.npy", ... Not starting with "_": a part
# named `__key__` or `__url__` would overwrite what a reader (ours, or webdataset) puts under those names.
_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9_]{0,63}(\.[A-Za-z0-9_]{1,64}){0,3}")
_SHARD = re.compile(r"(?:shards|rejects)/[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}\.tar")


class UnsafeName(UserFacingError, ValueError):
    """A name from data that could address something outside its sample or directory; the message says which."""


def check_key(key: str, where: str = "") -> str:
    """`key` if it is a plain sample key, else UnsafeName."""
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise UnsafeName(f"{where + ': ' if where else ''}{key!r} is not a sample key (letters, digits, '_' and "
                         f"'-' only, no dots or path separators); refusing it")
    return key


def check_part(part: str, where: str = "") -> str:
    """`part` (the member name after `KEY.`, e.g. "ref0.png") if it is plain, else UnsafeName."""
    if not isinstance(part, str) or not _PART.fullmatch(part):
        raise UnsafeName(f"{where + ': ' if where else ''}member part {part!r} is not a plain name such as "
                         f"'json' or 'ref0.png'; refusing it")
    return part


def split_member(name: str, where: str = "") -> tuple[str, str]:
    """(key, part) of a tar member `KEY.PART`, both checked."""
    key, dot, part = name.partition(".")
    if not dot:
        raise UnsafeName(f"{where + ': ' if where else ''}member {name!r} is not KEY.PART; refusing it")
    try:
        return check_key(key), check_part(part)
    except UnsafeName:
        raise UnsafeName(f"{where + ': ' if where else ''}member {name!r} is not KEY.PART with a plain key and "
                         f"part (no path separators, no '..'); refusing it") from None


def check_shard(rel: str, where: str | Path = "") -> str:
    """`rel` if it is a shard path as index.json, the ledger and the manifest write it (`shards/NAME.tar`, or
    `rejects/NAME.tar` for the examples of dropped clips), else UnsafeName."""
    if not isinstance(rel, str) or not _SHARD.fullmatch(rel):
        raise UnsafeName(f"{where}: shard path {rel!r} is not shards/NAME.tar or rejects/NAME.tar; refusing to "
                         "open it")
    return rel


def shard_path(out_dir: str | Path, rel: str) -> Path:
    """`out_dir / rel` for a checked shard path (`check_shard`) in a POSIX output directory."""
    return Path(out_dir) / check_shard(rel, out_dir)


PERSON = "person"


GROUNDED_KINDS = ("subject", "object")


def path_id(path: str) -> str:
    """Source id for files with no content to identify them (empty, unreadable): distinct per path."""
    return "path-" + hashlib.sha256(path.encode()).hexdigest()


CROSS_PREFIX = "cross"


KEY_SUFFIX = "-x"
