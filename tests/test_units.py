import pytest

from agent.units import parse_compute_pct, parse_duration_s, parse_size_mib


@pytest.mark.parametrize(
    ("text", "mib"),
    [
        ("512MiB", 512),
        ("8GiB", 8192),
        ("8G", 8192),
        ("8gb", 8192),
        ("1TiB", 1048576),
        ("4096", 4096),
        (" 1.5GiB ", 1536),
        (300, 300),
    ],
)
def test_sizes(text: str | int, mib: int) -> None:
    assert parse_size_mib(text) == mib


@pytest.mark.parametrize("text", ["", "GiB", "8XB", "-1", "0", "0.1KiB", "8 G B", 0])
def test_bad_sizes(text: str | int) -> None:
    with pytest.raises(ValueError, match="512MiB|positive|smaller"):
        parse_size_mib(text)


@pytest.mark.parametrize(("text", "pct"), [("30", 30), ("30%", 30), (" 5 % ", 5), (100, 100)])
def test_compute(text: str | int, pct: int) -> None:
    assert parse_compute_pct(text) == pct


@pytest.mark.parametrize("text", ["0", "101", "3.5", "x", "-10", ""])
def test_bad_compute(text: str) -> None:
    with pytest.raises(ValueError, match="percentage"):
        parse_compute_pct(text)


@pytest.mark.parametrize(
    ("text", "s"), [("90", 90), ("90s", 90), ("10m", 600), ("1h", 3600), ("2d", 172800)]
)
def test_durations(text: str, s: float) -> None:
    assert parse_duration_s(text) == s


@pytest.mark.parametrize("text", ["0", "1w", "x", "-5m"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="duration|positive"):
        parse_duration_s(text)
