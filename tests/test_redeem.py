"""The redeem steps of docs/grant-format.md as tables, without a server or a database.

`check_redeem` (steps 3–6) takes the claims and what the database said; each
row below changes one thing of a state that redeems, and names the reason the
first failing step must give. `decode_grant` (step 2) gets the same treatment.
"""

from __future__ import annotations

import base64
import dataclasses
import inspect
import json
import re

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from clipstore.errors import ClipstoreError, Reason
from clipstore.grants import SIGNING_CONTEXT, GrantClaims, _invalid, check_grant_time, decode_grant, encode_grant
from clipstore.review.redeem import RedeemState, check_redeem
from clipstore.rows import ClipRow, GrantRow

NOW = 1_800_000_000
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
CLAIMS = GrantClaims(grant_id="g_1", reviewer_id="p_rev", session_id="s_1", assignment_id="as_1",
                     review_clip_id="rc_1", issued_at=NOW - 10, expires_at=NOW + 110)
GRANT = GrantRow(grant_id="g_1", reviewer_id="p_rev", session_id="s_1", assignment_id="as_1", clip_id="c_1",
                 account_ref="acct_1", expires_at=NOW + 110, redeemed_at=None, voided=False)
CLIP = ClipRow(clip_id="c_1", account_ref="acct_1", size_bytes=10, sealed_bytes=100, content_type="audio/opus",
               locale="en-US", device_type="echo", duration_ms=1000, captured_at=None, wake_word=True,
               created_at=NOW - 100, expires_at=NOW + 86400, key_version=1, wrapped_dek=b"w", identity_ct=b"i")
STATE = RedeemState(caller_id="p_rev", session_id="s_1", review_clip_id="rc_1", reviewer_enabled=True, grant=GRANT,
                    clip=CLIP, assignment_exists=True, account_allows_review=True)


def _claims(**changes: object) -> GrantClaims:
    return dataclasses.replace(CLAIMS, **changes)  # type: ignore[arg-type]


def _state(**changes: object) -> RedeemState:
    return dataclasses.replace(STATE, **changes)  # type: ignore[arg-type]


def test_a_live_grant_for_the_caller_session_and_clip_redeems() -> None:
    check_redeem(CLAIMS, STATE, now=NOW)  # raises nothing


# (why, claims, state, now, reason): one change from the happy path per row, in step order.
DENIALS = [
    # 3. time
    ("expired at the second", CLAIMS, STATE, CLAIMS.expires_at, "GRANT_EXPIRED"),
    ("expired long ago", CLAIMS, STATE, NOW + 3600, "GRANT_EXPIRED"),
    ("issued in the future beyond skew", _claims(issued_at=NOW + 6, expires_at=NOW + 100), STATE, NOW,
     "GRANT_INVALID"),
    # 4. binding
    ("another reviewer", CLAIMS, _state(caller_id="p_other"), NOW, "GRANT_WRONG_REVIEWER"),
    ("another session", CLAIMS, _state(session_id="s_2"), NOW, "GRANT_WRONG_SESSION"),
    ("another clip", CLAIMS, _state(review_clip_id="rc_2"), NOW, "GRANT_WRONG_CLIP"),
    # 5. still live
    ("reviewer disabled", CLAIMS, _state(reviewer_enabled=False), NOW, "REVIEWER_DISABLED"),
    ("no grant row", CLAIMS, _state(grant=None), NOW, "GRANT_REVOKED"),
    ("grant voided", CLAIMS, _state(grant=dataclasses.replace(GRANT, voided=True)), NOW, "GRANT_REVOKED"),
    # 6. the clip may still be heard
    ("clip deleted", CLAIMS, _state(clip=None), NOW, "CLIP_GONE"),
    ("clip expired", CLAIMS, _state(clip=dataclasses.replace(CLIP, expires_at=NOW)), NOW, "CLIP_GONE"),
    ("assignment gone", CLAIMS, _state(assignment_exists=False), NOW, "CLIP_GONE"),
    ("account opted out", CLAIMS, _state(account_allows_review=False), NOW, "ACCOUNT_OPTED_OUT"),
]


@pytest.mark.parametrize(("claims", "state", "now", "reason"), [d[1:] for d in DENIALS],
                         ids=[d[0] for d in DENIALS])
def test_each_redeem_step_refuses_with_its_reason(claims: GrantClaims, state: RedeemState, now: float,
                                                   reason: str) -> None:
    with pytest.raises(ClipstoreError) as caught:
        check_redeem(claims, state, now=now)
    assert caught.value.reason == reason
    assert Reason(reason).kind is caught.value.kind


def test_the_table_reaches_every_reason_the_redeem_steps_can_raise() -> None:
    source = inspect.getsource(check_redeem) + inspect.getsource(check_grant_time) + inspect.getsource(_invalid)
    raised = set(re.findall(r'reason="([A-Z_]+)"', source))
    assert raised == {d[-1] for d in DENIALS}


def test_the_first_failing_step_wins() -> None:
    everything_wrong = RedeemState(caller_id="p_other", session_id="s_2", review_clip_id="rc_2",
                                   reviewer_enabled=False, grant=None, clip=None, assignment_exists=False,
                                   account_allows_review=False)
    states = [everything_wrong, _state(session_id="s_2", review_clip_id="rc_2", reviewer_enabled=False),
              _state(review_clip_id="rc_2", grant=None), _state(reviewer_enabled=False, clip=None),
              _state(grant=None, account_allows_review=False), _state(clip=None, account_allows_review=False)]
    reasons = []
    for now, state in zip([NOW + 3600] + [NOW] * 5, states, strict=True):
        with pytest.raises(ClipstoreError) as caught:
            check_redeem(CLAIMS, state, now=now)
        reasons.append(caught.value.reason)
    assert reasons == ["GRANT_EXPIRED", "GRANT_WRONG_SESSION", "GRANT_WRONG_CLIP", "REVIEWER_DISABLED",
                       "GRANT_REVOKED", "CLIP_GONE"]


# -- step 2: form and signature -------------------------------------------------------------------------
TOKEN = encode_grant(CLAIMS, KEY)
_, BODY, SIGNATURE = TOKEN.split(".")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _signed(raw_body: bytes) -> str:
    """A token correctly signed by the grant key: only the body's content is wrong."""
    body = _b64(raw_body)
    return f"v1.{body}.{_b64(KEY.sign(SIGNING_CONTEXT + f'v1.{body}'.encode()))}"


def _signed_body(fields: object) -> str:
    return _signed(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode())


def _flip(text: str, i: int) -> str:
    return text[:i] + ("A" if text[i] != "A" else "B") + text[i + 1:]


FIELDS = dataclasses.asdict(CLAIMS)
MALFORMED = [
    ("empty", ""),
    ("no dots", "v1" + BODY + SIGNATURE),
    ("one dot", f"v1.{BODY}{SIGNATURE}"),
    ("three parts too many", f"{TOKEN}.x"),
    ("too long", f"v1.{BODY}.{SIGNATURE}" + "A" * 1024),
    ("wrong prefix", f"v2.{BODY}.{SIGNATURE}"),
    ("no prefix", f".{BODY}.{SIGNATURE}"),
    ("empty signature", f"v1.{BODY}."),
    ("signature flipped", f"v1.{BODY}.{_flip(SIGNATURE, 0)}"),
    ("body flipped", f"v1.{_flip(BODY, 5)}.{SIGNATURE}"),
    ("signed by another key", encode_grant(CLAIMS, Ed25519PrivateKey.generate())),
    ("signed without the domain separation", f"v1.{BODY}.{_b64(KEY.sign(f'v1.{BODY}'.encode()))}"),
    ("body is not JSON", _signed(b"not json")),
    ("body is not UTF-8", _signed(b'{"grant_id":"\xff"}')),
    ("body is a JSON list", _signed_body(list(FIELDS.values()))),
    ("a claim is missing", _signed_body({k: v for k, v in FIELDS.items() if k != "session_id"})),
    ("an unknown claim", _signed_body({**FIELDS, "admin": True})),
    ("reviewer_id is a number", _signed_body({**FIELDS, "reviewer_id": 7})),
    ("review_clip_id is a list", _signed_body({**FIELDS, "review_clip_id": ["rc_1"]})),
    ("grant_id is null", _signed_body({**FIELDS, "grant_id": None})),
]


@pytest.mark.parametrize("token", [m[1] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_a_malformed_or_forged_grant_is_grant_invalid(token: str) -> None:
    with pytest.raises(ClipstoreError) as caught:
        decode_grant(token, KEY.public_key())
    assert caught.value.reason == "GRANT_INVALID"
    assert SIGNATURE not in caught.value.message and BODY not in caught.value.message


def test_a_well_formed_grant_decodes_to_its_claims() -> None:
    assert decode_grant(TOKEN, KEY.public_key()) == CLAIMS
    assert decode_grant(_signed_body(FIELDS), KEY.public_key()) == CLAIMS
