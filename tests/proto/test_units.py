"""Byte sizes as written and read (``chainfed.proto.units``)."""

import pytest

from chainfed.proto.units import format_bytes, parse_bytes

MIB = 1 << 20
GIB = 1 << 30


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.5GiB", 3 * GIB // 2),
        ("1.5 gib", 3 * GIB // 2),
        ("200MiB", 200 * MIB),
        ("200mb", 200_000_000),
        ("8GB", 8_000_000_000),
        ("64KiB", 64 * 1024),
        ("64kb", 64_000),
        ("512B", 512),
        ("512", 512),
        (" 2 TiB ", 2 << 40),
        (".5MiB", MIB // 2),
    ],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "1.5 GiBs", "-1GiB", "1e9", "8G", "1,5GiB", "nan"])
def test_parse_bytes_rejects_bad_sizes_naming_them(text):
    with pytest.raises(ValueError, match=f"invalid memory size {text!r}"):
        parse_bytes(text)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1536, "1.5 KiB"),
        (200 * MIB, "200 MiB"),
        (3 * GIB // 2, "1.5 GiB"),
        (-12 * MIB, "-12 MiB"),
    ],
)
def test_format_bytes(n, text):
    assert format_bytes(n) == text


@pytest.mark.parametrize("n", [0, 1, 1023, 1536, 200 * MIB, 3 * GIB // 2, 7 * GIB + 3 * MIB])
def test_format_parse_round_trip(n):
    assert abs(parse_bytes(format_bytes(n)) - n) <= n * 0.005
