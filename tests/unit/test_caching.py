"""tether.caching: a cache keyed by program text is bounded by the bytes of that text, not by entries."""

from __future__ import annotations

from tether.caching import bytes_lru_cache


def test_bounded_by_bytes_least_recently_used_first():
    calls = []

    @bytes_lru_cache(max_bytes=3 * (64 + 100))
    def parse(text: str) -> int:
        calls.append(text)
        return len(text)

    texts = [c * 100 for c in "abcd"]
    for t in texts[:3]:
        parse(t)
    parse(texts[0])  # a hit: "a" is now the most recently used
    parse(texts[3])  # evicts "b", the least recently used
    assert parse.cache_bytes() == 3 * (64 + 100)
    parse(texts[0])
    parse(texts[1])
    assert calls == [*texts, texts[1]]


def test_a_call_heavier_than_the_cache_is_not_kept():
    @bytes_lru_cache(max_bytes=1000)
    def parse(text: str, name: str = "") -> str:
        return text.upper()

    assert parse("x" * 5000, name="big") == "X" * 5000
    assert parse.cache_bytes() == 0
    parse("small", name="s")
    assert 0 < parse.cache_bytes() <= 1000
