"""The engine's memory tier is bounded in bytes as well as in adapters (issue 21, item 10): a few large adapters
of a big base model must not stay in memory just because their count is under the limit."""

from __future__ import annotations

from adapters.engine.residency import LruTier


def test_the_memory_tier_evicts_by_bytes_least_recently_used_first() -> None:
    pinned = {"c"}
    tier: LruTier[str, int] = LruTier(128, keep=lambda key: key in pinned, max_bytes=100, size_of=lambda size: size)
    for key, size in (("a", 40), ("b", 40), ("c", 40)):
        tier.put(key, size)
    assert tier.overflow() == ["a"]  # 120 bytes held, 100 allowed: the least recently used goes, not 128 - 3
    tier.touch("a")
    assert tier.overflow() == ["b"]
    tier.put("d", 90)
    # b and a go, and so does d: with c pinned, c + d (130 bytes) still do not fit.
    assert tier.overflow() == ["b", "a", "d"]
    tier.put("e", 50)
    tier.pop("a"), tier.pop("b"), tier.pop("d")
    assert tier.overflow() == []  # c + e = 90
    assert LruTier(2, keep=lambda key: False).overflow() == []


def test_without_a_byte_bound_the_tier_counts_entries() -> None:
    tier: LruTier[str, int] = LruTier(2, keep=lambda key: False)
    for key in "abc":
        tier.put(key, 10**9)
    assert tier.overflow() == ["a"]
