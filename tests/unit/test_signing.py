"""workers.signing: a task message is accepted only with the fleet key's signature over every field."""

from __future__ import annotations

import copy

from workers.signing import SIG_FIELD, sign, verify

MSG = {"v": 2, "job": "j", "batch": 3, "out": "/data/out", "row_ids": [7, 8], "ids": ["a", 9], "texts": ["x", "é"]}


def test_a_signed_message_verifies_and_any_change_breaks_it():
    m = sign(copy.deepcopy(MSG), "k1")
    assert verify(m, "k1")
    assert not verify(m, "k2"), "another fleet's key"
    for field, value in (("out", "/etc"), ("batch", 4), ("texts", ["x", "e"]), ("ids", ["a", "9"])):
        forged = {**m, field: value}
        assert not verify(forged, "k1"), field
    assert not verify({k: v for k, v in m.items() if k != SIG_FIELD}, "k1"), "unsigned"
    assert not verify({**m, SIG_FIELD: 12}, "k1") and not verify("not a dict", "k1")


def test_the_signature_ignores_key_order():
    m = sign(copy.deepcopy(MSG), "k")
    reordered = dict(reversed(list(m.items())))
    assert verify(reordered, "k")


def test_values_that_msgpack_cannot_pack_or_keys_that_do_not_sort_are_refused_not_raised():
    m = sign(copy.deepcopy(MSG), "k")
    assert not verify({**m, "texts": [object()]}, "k")
    assert not verify({**m, 3: "x"}, "k"), "an int key beside str keys"
