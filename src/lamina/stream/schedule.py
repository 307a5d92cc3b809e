"""The order of background hydration (pure logic, no I/O).

Chunks of the image's boot profile come first, in the order boots first read them, then
every other chunk by position (sequential on the server's packs and in the local data
file). Reads that miss the cache do not go through here: they are fetched at once and
the scheduler just skips what is cached or already on its way.
"""

from __future__ import annotations

from collections.abc import Container, Iterable

from lamina.store import ZERO_ID
from lamina.stream.index import CacheIndex


class Hydration:
    def __init__(self, index: CacheIndex, profile: Iterable[int] = ()) -> None:
        self.index = index
        manifest = index.manifest
        order: list[bytes] = []
        seen: set[bytes] = set()
        profiled = 0
        for group, positions in enumerate((profile, range(manifest.count))):
            for i in positions:
                if not 0 <= i < manifest.count:
                    continue  # a profile recorded against other geometry: ignore the rest
                cid = manifest.id_at(i)
                if cid == ZERO_ID or cid in seen:
                    continue
                seen.add(cid)
                order.append(cid)
                profiled += group == 0
        self.order = order
        self.profiled = profiled  # how many of ``order`` come from the profile
        self._next = 0

    def take(
        self, limit: int, busy: Container[bytes] = (), *, profile_only: bool = False
    ) -> list[bytes]:
        """Up to ``limit`` next chunk ids neither cached nor ``busy`` (being fetched);
        with ``profile_only``, none past the boot profile.

        The cursor only moves past cached ids: an id whose fetch failed is no longer busy
        and comes up again on the next call, with no bookkeeping of failures here."""
        out: list[bytes] = []
        i = self._next
        end = self.profiled if profile_only else len(self.order)
        settled = True
        while i < end and len(out) < limit:
            cid = self.order[i]
            if self.index.id_cached(cid):
                if settled:
                    self._next = i + 1
            else:
                settled = False
                if cid not in busy:
                    out.append(cid)
            i += 1
        return out

    @property
    def profile_done(self) -> bool:
        """Every chunk of the boot profile is cached (the cursor only passes cached ids)."""
        while self._next < self.profiled and self.index.id_cached(self.order[self._next]):
            self._next += 1
        return self._next >= self.profiled

    @property
    def done(self) -> bool:
        return self.index.missing_ids == 0

    def profile_ids(self) -> set[bytes]:
        return set(self.order[: self.profiled])
