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


def test_text_inside_a_keys_tuples_and_sets_weighs_too():
    @bytes_lru_cache(max_bytes=10_000)
    def check(source: str, bound: frozenset) -> int:
        return len(bound)

    for i in range(50):  # each key: a short source and 4 KiB of names bound to it
        check("y = x", frozenset({(f"x{i}", "m" * 4096)}))
    assert check.cache_bytes() <= 10_000


def test_the_policys_path_cache_is_bounded_by_bytes():
    from tether.server.policy import DEFAULT_POLICY, _resolved_refusal

    _resolved_refusal.cache_clear()
    for i in range(300):  # made-up 4 KiB paths under an allowed module
        DEFAULT_POLICY.path_refusal("torch." + f"x{i}" * 2000)
    assert 0 < _resolved_refusal.cache_bytes() <= 1 << 20
