"""Data made elsewhere (a shared output directory, its shards, KEY.json, index.json, a foreign run's config.yaml) is
hostile until checked. This module holds the limits every reader of such data applies, in one place, and the
parsers that apply them before anything is allocated: JSON with size and depth limits, YAML with alias expansion
bounded, images and videos checked for pixel count from their headers before a pixel is decoded, and text from data
made safe to print on a terminal.

The defaults are sized from what the pipeline itself writes, with a wide margin: a KEY.json is a few tens of KB
(8 MiB allowed), a clip a few MB (1 GiB allowed), a reference image at most the clip's size (36 MP allowed: 8K is
33 MP). Each limit can be raised for one process tree with an environment variable `S2V_LIMIT_<NAME>` (e.g.
`S2V_LIMIT_MAX_PIXELS=80000000`); the environment reaches Ray workers and DataLoader workers alike, which a
command-line flag would not. docs/security.md lists them and what each command does with data over them.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import re
import warnings
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.core.errors import UserFacingError

MB = 1 << 20
ENV_PREFIX = "S2V_LIMIT_"


class HostileData(UserFacingError, ValueError):
    """Data from elsewhere that breaks a limit or is not what this project writes; the message names it and the
    limit (and the variable that raises the limit, where one does)."""


class ReadLimits(BaseModel):
    """What a reader of data made elsewhere accepts. Field names are the `S2V_LIMIT_<NAME>` variables."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_json_mb: float = Field(8.0, gt=0, description="one KEY.json, or one ledger line")
    max_index_mb: float = Field(256.0, gt=0, description="index.json, summary.json, a run's config.yaml")
    max_json_depth: int = Field(64, ge=4, description="nesting of any JSON or YAML document")
    max_yaml_nodes: int = Field(200_000, ge=100, description="a YAML document's nodes with its aliases expanded")
    max_video_mb: float = Field(1024.0, gt=0, description="one KEY.mp4 tar member")
    max_image_mb: float = Field(64.0, gt=0, description="one KEY.*.png tar member")
    max_array_mb: float = Field(256.0, gt=0, description="one KEY.*.npy tar member")
    max_other_mb: float = Field(64.0, gt=0, description="any other tar member")
    max_pixels: int = Field(36_000_000, ge=1, description="width x height of an image, or of one video frame")
    max_frames: int = Field(1_000_000, ge=1, description="frames of one clip")
    max_entities: int = Field(256, ge=1, description="entities, references or faces of one sample, and ids")

    def part_bytes(self, part: str) -> int:
        """The cap for the tar member `KEY.<part>` (its size as the tar header declares it)."""
        ext = part.rsplit(".", 1)[-1]
        mb = {"mp4": self.max_video_mb, "png": self.max_image_mb, "jpg": self.max_image_mb,
              "npy": self.max_array_mb, "json": self.max_json_mb}.get(ext, self.max_other_mb)
        return int(mb * MB)

    def largest_part_bytes(self) -> int:
        return max(int(mb * MB) for mb in (self.max_video_mb, self.max_image_mb, self.max_array_mb,
                                           self.max_json_mb, self.max_other_mb))


@functools.lru_cache(maxsize=1)
def read_limits() -> ReadLimits:
    """The limits of this process: the defaults, with any `S2V_LIMIT_<NAME>` variable applied."""
    values = {name: os.environ[ENV_PREFIX + name.upper()] for name in ReadLimits.model_fields
              if ENV_PREFIX + name.upper() in os.environ}
    try:
        return ReadLimits(**values)
    except ValidationError as exc:
        problems = "; ".join(f"{ENV_PREFIX}{str(e['loc'][0]).upper()}: {e['msg']}" for e in exc.errors())
        raise HostileData(f"read limits from the environment: {problems}") from None


# ---------------------------------------------------------------------------------------------------------------
# JSON and YAML


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses as infinity, which JSON cannot write back
        raise ValueError(f"{text[:40]} is not a finite number")
    return value


def load_json(data: bytes | str, what: str, max_bytes: int | None = None) -> Any:
    """`data` parsed as strict JSON (no NaN/Infinity), refused with HostileData when it is larger than `max_bytes`
    (default: max_json_mb), nested deeper than max_json_depth, or not JSON. `what` names it in the message."""
    limits = read_limits()
    cap = max_bytes if max_bytes is not None else int(limits.max_json_mb * MB)
    if len(data) > cap:
        raise HostileData(f"{what}: {len(data)} bytes, over the {cap} byte limit")
    try:
        value = json.loads(data, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise HostileData(f"{what}: nested deeper than {limits.max_json_depth} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise HostileData(f"{what}: not valid JSON ({str(exc)[:200]})") from None
    _check_depth(value, what, limits.max_json_depth)
    return value


def _check_depth(value: Any, what: str, max_depth: int) -> None:
    """Iterative (a recursive walk is what a deep document attacks)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > max_depth:
                raise HostileData(f"{what}: nested deeper than {max_depth} levels")
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))


def load_yaml(text: str, what: str) -> Any:
    """`text` as YAML (the safe loader: no Python objects), refused when larger than max_index_mb, when its aliases
    expand to more than max_yaml_nodes nodes (a "billion laughs" is a few hundred bytes), when it refers to itself,
    or when nested deeper than max_json_depth. The node graph is checked before anything is constructed."""
    limits = read_limits()
    if len(text) > limits.max_index_mb * MB:
        raise HostileData(f"{what}: {len(text)} bytes, over the {int(limits.max_index_mb * MB)} byte limit")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node, what, limits)
        return loader.construct_document(node)
    except RecursionError:
        raise HostileData(f"{what}: nested deeper than {limits.max_json_depth} levels") from None
    except yaml.YAMLError as exc:
        raise HostileData(f"{what}: not valid YAML ({str(exc)[:300]})") from None
    finally:
        loader.dispose()


def _check_nodes(root: yaml.Node, what: str, limits: ReadLimits) -> None:
    """Counts the nodes of a composed YAML document with every alias expanded, without expanding anything (an alias
    is the same node object again: its size is memoised); refuses cycles, depth and size over the limits."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, done = stack.pop()
        children = _children(node)
        ident = id(node)
        if done:
            on_path.discard(ident)
            sizes[ident] = 1 + sum(sizes.get(id(c), 1) for c in children)
            if sizes[ident] > limits.max_yaml_nodes:
                raise HostileData(f"{what}: expands to more than {limits.max_yaml_nodes} nodes (aliases repeated "
                                  "over and over); refusing it")
            continue
        if ident in sizes or not children:
            continue
        if ident in on_path:
            raise HostileData(f"{what}: refers to itself (a recursive alias); refusing it")
        if depth > limits.max_json_depth:
            raise HostileData(f"{what}: nested deeper than {limits.max_json_depth} levels")
        on_path.add(ident)
        stack.append((node, depth, True))
        stack.extend((child, depth + 1, False) for child in children)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def load_npy(data: bytes, what: str):
    """A `.npy` member as an array, without pickles and without trusting its header: the shape and dtype it declares
    must account for exactly the bytes that follow (numpy would allocate the declared size first), and object
    arrays are refused. HostileData otherwise."""
    import numpy as np

    buffer = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buffer)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(buffer, max_header_size=10_000)
    except (ValueError, OSError, SyntaxError) as exc:
        raise HostileData(f"{what}: not a .npy array ({exc})") from None
    if dtype.hasobject:
        raise HostileData(f"{what}: an array of Python objects (a pickle); refusing it")
    count = math.prod(shape)
    if count * dtype.itemsize != len(data) - buffer.tell():
        raise HostileData(f"{what}: declares {shape} {dtype}, which is not the {len(data) - buffer.tell()} bytes "
                          "it holds")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=buffer.tell())
    return array.reshape(shape, order="F" if fortran else "C")


# ---------------------------------------------------------------------------------------------------------------
# Pixels


def check_image(data: bytes, what: str) -> tuple[int, int]:
    """(width, height) of an encoded image, read from its header alone; HostileData when it holds more than
    max_pixels pixels or Pillow cannot read its header. Call before decoding it."""
    from PIL import Image, UnidentifiedImageError

    limit = read_limits().max_pixels
    try:
        with warnings.catch_warnings():  # Pillow's own bomb warning: the check below is the one that decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:  # reads the header only
                width, height = image.size
    except Image.DecompressionBombError as exc:  # Pillow's own hard limit (twice its MAX_IMAGE_PIXELS): over ours
        size = re.search(r"\((\d+) pixels\)", str(exc))
        raise HostileData(f"{what}: {size.group(1) + ' pixels, ' if size else ''}over the limit of {limit} pixels "
                          f"({ENV_PREFIX}MAX_PIXELS); not decoded") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise HostileData(f"{what}: not a readable image ({printable(exc)})") from None
    if width < 1 or height < 1 or width * height > limit:
        raise HostileData(f"{what}: {width}x{height} pixels, over the limit of {limit} "
                          f"({ENV_PREFIX}MAX_PIXELS); not decoded")
    return width, height


# ---------------------------------------------------------------------------------------------------------------
# Text for a terminal

# C0 and C1 controls and DEL (escape sequences: titles, OSC 52 clipboard writes, screen clears), and the Unicode
# bidi overrides and isolates that reorder what a reader sees.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: Any) -> str:
    """`text` with every control character shown as a Python escape (`\\x1b`), so a terminal prints it and does
    nothing else. Rich markup in it still needs `rich.markup.escape` or a `Text` object."""
    text = str(text)
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text).replace("\n", "\\n") \
        .replace("\t", "\\t")
