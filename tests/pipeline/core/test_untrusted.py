"""The limits and parsers for data made elsewhere (pipeline/core/untrusted.py): each hostile case of issue 20 that
these parsers stop, at the default limits, with the message a user sees."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from pipeline.core.untrusted import (
    HostileData,
    check_image,
    load_json,
    load_npy,
    load_yaml,
    printable,
    read_limits,
)


@pytest.fixture
def limits_env(monkeypatch):
    """Set S2V_LIMIT_* variables for one test; the cached limits are re-read before and after."""
    read_limits.cache_clear()
    yield monkeypatch
    read_limits.cache_clear()


def billion_laughs(levels: int = 9) -> str:
    """The classic: nine aliases per level, nine levels: about 500 bytes that expand to 9**9 strings."""
    lines = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        name, prev = chr(ord("a") + i), chr(ord("a") + i - 1)
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    return "\n".join(lines) + "\n"


def test_a_billion_laughs_is_refused_before_anything_is_built():
    text = billion_laughs()
    assert len(text) < 600
    with pytest.raises(HostileData, match="expands to more than 200000 nodes"):
        load_yaml(text, "config.yaml")


def test_merge_keys_cannot_multiply_either():
    text = "a: &a {x: 1, y: 2}\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} {{<<: [{', '.join([f'*{chr(97 + i)}'] * 9)}]}}\n" for i in range(9))
    with pytest.raises(HostileData, match="expands to more than"):
        load_yaml(text, "config.yaml")


def test_yaml_that_refers_to_itself_or_nests_deeply_is_refused():
    with pytest.raises(HostileData, match="refers to itself"):
        load_yaml("a: &a [1, *a]\n", "config.yaml")
    with pytest.raises(HostileData, match="nested deeper than 64"):
        load_yaml("[" * 5000 + "]" * 5000, "config.yaml")


def test_ordinary_yaml_with_anchors_still_loads():
    assert load_yaml("base: &b {p: 1}\nrun: {<<: *b, q: 2}\nlist: [*b, *b]\n", "c") == {
        "base": {"p": 1}, "run": {"p": 1, "q": 2}, "list": [{"p": 1}, {"p": 1}]}


def test_json_depth_size_and_non_numbers():
    with pytest.raises(HostileData, match="nested deeper than 64"):
        load_json(b"[" * 100_000 + b"]" * 100_000, "KEY.json")
    with pytest.raises(HostileData, match="nested deeper than 64"):
        load_json(b'{"a":' * 70 + b"1" + b"}" * 70, "KEY.json")
    with pytest.raises(HostileData, match="NaN is not a JSON number"):
        load_json(b'{"height": NaN}', "KEY.json")
    with pytest.raises(HostileData, match="1e999 is not a finite number"):
        load_json(b'{"height": 1e999}', "KEY.json")  # infinity: json.dumps would write it back as Infinity
    with pytest.raises(HostileData, match="over the 100 byte limit"):
        load_json(b" " * 101, "KEY.json", max_bytes=100)
    assert load_json(b'{"a": [1, 2.5, "x"]}', "KEY.json") == {"a": [1, 2.5, "x"]}


def test_limits_come_from_the_environment(limits_env):
    limits_env.setenv("S2V_LIMIT_MAX_JSON_DEPTH", "8")
    assert read_limits().max_json_depth == 8
    with pytest.raises(HostileData, match="nested deeper than 8"):
        load_json(b"[" * 9 + b"]" * 9, "KEY.json")
    limits_env.setenv("S2V_LIMIT_MAX_PIXELS", "lots")
    read_limits.cache_clear()
    with pytest.raises(HostileData, match="S2V_LIMIT_MAX_PIXELS"):
        read_limits()


def _png(size: tuple[int, int], mode: str = "1") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def test_an_image_is_measured_from_its_header_before_decoding():
    bomb = _png((13000, 13000))  # a few KB that decode to 169 megapixels
    assert len(bomb) < 64_000
    with pytest.raises(HostileData, match="13000x13000 pixels, over the limit of 36000000"):
        check_image(bomb, "KEY.ref0.png")
    assert check_image(_png((64, 48), "RGB"), "KEY.ref0.png") == (64, 48)
    with pytest.raises(HostileData, match="not a readable image"):
        check_image(b"\x89PNG\r\n\x1a\n garbage", "KEY.ref0.png")


def test_npy_headers_are_not_trusted():
    rows = np.arange(6, dtype=np.float32).reshape(2, 3)
    buffer = io.BytesIO()
    np.save(buffer, rows, allow_pickle=False)
    assert np.array_equal(load_npy(buffer.getvalue(), "KEY.faces.npy"), rows)
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"x": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(HostileData, match="array of Python objects"):
        load_npy(pickled.getvalue(), "KEY.faces.npy")
    # A header declaring ten billion rows over 24 bytes of data: numpy would allocate 80 GB first.
    header = np.lib.format.header_data_from_array_1_0(rows)
    header["shape"] = (10_000_000_000, 3)
    forged = io.BytesIO()
    np.lib.format.write_array_header_1_0(forged, header)
    liar = forged.getvalue() + rows.tobytes()
    with pytest.raises(HostileData, match="not the 24 bytes it holds"):
        load_npy(liar, "KEY.faces.npy")


def test_text_for_a_terminal_shows_control_characters_escaped():
    hostile = "cat\x1b]0;owned\x07\x1b]52;c;ZXZpbA==\x07\x1b[2J\u202egpj.exe\x9b"
    shown = printable(hostile)
    assert "\x1b" not in shown and "\x07" not in shown and "\u202e" not in shown and "\x9b" not in shown
    assert shown.startswith("cat\\x1b]0;owned\\x07") and "\\u202e" in shown
    assert printable("a woman, smiling") == "a woman, smiling"
    assert json.loads(json.dumps(hostile)) == hostile  # JSON output escapes them by itself
