"""The one seed derivation of the package: every random draw that must repeat (a batch of samples, a held-out split,
a replay subset) is seeded by `derive_seed(seed, *keys)`, a hash of the run's seed and the keys that name the draw
(a stage tag, an iteration, a batch's first prompt id, a call counter). Nothing depends on the process that draws,
on how many processes share the work, or on what was drawn before, so a resumed or re-split run draws the same."""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *keys) -> int:
    """A 63-bit seed from `seed` and `keys` (anything with a stable `str`): sha256 of `seed/key1/key2/...`."""
    text = "/".join(str(part) for part in (seed, *keys))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)


__all__ = ["derive_seed"]
