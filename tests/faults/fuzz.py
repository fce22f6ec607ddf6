"""Fuzzed ``heimdall.iq/v1`` payloads: valid ones mutated in every way a producer can get wrong, seeded.

Each payload is JSON-serialisable (what a producer publishes). ``huge_every`` makes every n-th one a
20 MB payload (a 20 MB IQ string, or 20 MB in an unknown field).
"""

from __future__ import annotations

import base64
import copy
import random
from collections.abc import Iterator

import numpy as np

JUNK = [None, True, 0, -1, 1e308, float("nan"), "", "x" * 300, [], [1, [2, [3]]], {}, {"a": {"b": {"c": [None]}}},
        "\x00", "\ud800", "2026-13-45T99:99:99Z"]


def _nested(rng: random.Random, depth: int):
    x: object = rng.choice(JUNK[:6])
    for _ in range(depth):
        x = [x] if rng.random() < 0.5 else {"k": x}
    return x


def _mutate(doc: dict, rng: random.Random) -> dict:
    d = copy.deepcopy(doc)
    recs = d["receivers"]
    r = rng.randrange(len(recs))
    kind = rng.randrange(16)
    if kind == 0:
        d.pop(rng.choice(["schema", "captured_at", "center_freq_hz", "sample_rate_hz", "receivers", "options"]), None)
    elif kind == 1:
        d[rng.choice(["schema", "captured_at", "center_freq_hz", "sample_rate_hz", "receivers", "options",
                      "session_id"])] = rng.choice(JUNK)
    elif kind == 2:
        d["receivers"] = recs[: rng.randrange(3)]
    elif kind == 3:
        d["receivers"] = recs + [copy.deepcopy(recs[0])]
    elif kind == 4:
        recs[r]["id"] = rng.choice(["roma", "tor\x00ino", "", 7, None, "\ud800", "x" * 500])
    elif kind == 5:
        recs[r]["iq"]["dtype"] = rng.choice(JUNK + ["cu8", "complex128"])
    elif kind == 6:
        recs[r]["iq"]["data"] = rng.choice(["@@not base64@@", recs[r]["iq"]["data"][:-7], 12, None, "AAAA"])
    elif kind == 7:
        n = rng.choice([2400, 100, 300_000])
        vals = rng.choice([np.nan, np.inf, 1e20, 0.5])
        recs[r]["iq"] = {"dtype": "complex64", "data": base64.b64encode(np.full(2 * n, vals, "<f4").tobytes()).decode()}
    elif kind == 8:
        d["center_freq_hz"] = rng.choice([433.5e6, -1, 0, 1e30])
    elif kind == 9:
        d["sample_rate_hz"] = rng.choice([11025.0, 5e-324, 2.4e6, 8000.0, 24000.0])
    elif kind == 10:
        d["captured_at"] = rng.choice(["0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "yesterday",
                                       "2026-11-23T07:00:00", "2026-11-23T07:00:00+01:00"])
    elif kind == 11:
        d["request_id"] = rng.choice(["nul\x00" + d["request_id"], d["request_id"] + "\ud800", 123,
                                      "r" * 500]) if rng.random() < 0.5 else d["request_id"] + "-ok"
    elif kind == 12:
        d["options"] = rng.choice([[], {"cache": "yes"}, {"model": ""}, {"model": 5}, {"cache": False}])
    elif kind == 13:
        d[f"extra_{rng.randrange(99)}"] = _nested(rng, rng.randrange(1, 8))
    elif kind == 14:
        recs[r]["gain_db"] = rng.choice([1e9, "3 dB", float("nan"), -250, 12.5])
    else:
        recs[r].pop("iq")
        recs[r]["iq_ref"] = rng.choice(["s3:///x.npy", "http://x/y", "s3://bucket/key.npy", 5])
    return d


def fuzzed(valid: list[dict], count: int, *, seed: int, tag: str, valid_every: int = 5,
           huge_every: int = 400) -> Iterator[tuple[str, dict]]:
    """(kind, payload) pairs: kind is "valid", "fuzz" or "huge"; every request id that is a string is unique."""
    rng = random.Random(seed)
    for i in range(count):
        base = copy.deepcopy(valid[i % len(valid)])
        base["request_id"] = f"{tag}-{i}"
        if huge_every and i % huge_every == huge_every // 2:
            if rng.random() < 0.5:
                base["receivers"][0]["iq"]["data"] = "A" * 20_000_000
            else:
                base["note"] = "n" * 20_000_000
            yield "huge", base
        elif i % valid_every == 0:
            yield "valid", base
        else:
            doc = _mutate(base, rng)
            if isinstance(doc.get("request_id"), str) and doc["request_id"] != base["request_id"]:
                doc["request_id"] = f"{doc['request_id']}-{i}"  # unique, whatever the mutation did
            yield "fuzz", doc
