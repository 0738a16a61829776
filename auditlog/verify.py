"""Verify an exported log: every entry, the chain, the tree, the checkpoint.

Plan (each step raises on its first failure, naming the entry index):
  1. open the checkpoint note with the verifier key (signature, origin);
  2. hash every entry into the RFC 9162 tree; the first checkpoint.size
     entries must hash to the signed root. If they do, every byte is what the
     log signed; if not (or entries are missing), re-read the entries and
     find the first defect: form, seq == i, prev == hash of entry i-1;
     failing that, truncation, or an edit the chain was rewritten to hide;
  3. seq and prev of every entry, and every account's access chain
     (`auditlog.access`: linear, none left out); entries past the checkpoint are parsed in
     full and counted (`unsigned_trailing`): no signature covers them, so a
     caller decides whether to accept them (`--strict` refuses);
  4. against a trusted checkpoint saved earlier: not smaller (rollback) and
     a prefix of this log (else: fork).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from auditlog._files import write_durably
from auditlog.access import AccountChains
from auditlog.checkpoint import Checkpoint, open_checkpoint
from auditlog.compact import CompactRange
from auditlog.cosignature import Cosignature, CosignatureVerifier, open_cosigned_checkpoint
from auditlog.entry import GENESIS_PREV, chain_link, parse_entry
from auditlog.errors import CheckpointError, EntryError, VerificationError
from auditlog.merkle import leaf_hash
from auditlog.note import NoteVerifier
from auditlog.tiles import verify_range

__all__ = ["CHECKPOINT_PATH", "StateFileError", "TileState", "VerifiedLog", "VerifiedTiles", "check_chain",
           "verify_log", "verify_tiles"]

CHECKPOINT_PATH = "checkpoint"

_LEAF_PREFIX = hashlib.sha256(b"\x00")


@dataclass(frozen=True)
class VerifiedLog:
    size: int
    root: bytes
    checkpoint: Checkpoint
    unsigned_trailing: int = 0  # entries after checkpoint.size: chained, but signed by nobody


def check_chain(entries: Iterable[bytes]) -> list[bytes]:
    """Parse every entry and check seq and prev; return the leaf hashes."""
    leaves: list[bytes] = []
    prevs: list[str] = []  # hex hash of each entry, to explain insertions
    for index, data in enumerate(entries):
        entry = parse_entry(data, index)
        seq = entry["seq"]
        if seq != index:
            if seq > index:
                gap = seq - index
                raise EntryError(index, f"seq is {seq}, expected {index}: "
                                        f"{gap} entr{'y' if gap == 1 else 'ies'} deleted or entries reordered")
            if 0 <= seq < index and entry["prev"] == (prevs[seq - 1] if seq else GENESIS_PREV):
                raise EntryError(seq, f"inserted: entry {index} carries seq {seq} and links to "
                                      f"entry {seq - 1}, so entries {seq}..{index - 1} are not original")
            raise EntryError(index, f"seq is {seq}, expected {index}: entries duplicated or reordered")
        if entry["prev"] != (prevs[-1] if prevs else GENESIS_PREV):
            raise EntryError(index - 1, f"edited: its hash no longer matches entry {index}'s prev")
        leaf = leaf_hash(data)
        leaves.append(leaf)
        prevs.append(leaf.hex())
    return leaves


def _open_trusted(note: str | bytes, verifier: NoteVerifier) -> Checkpoint:
    """The caller's saved checkpoint. Its failure names it: "FAIL checkpoint: invalid signature" alone
    reads as a fault of the export's checkpoint, when the team's own file is the one that does not open."""
    try:
        return open_checkpoint(note, verifier)
    except VerificationError as exc:
        raise CheckpointError(f"the trusted checkpoint: {exc}") from exc


def verify_log(entries: Callable[[], Iterable[bytes]], checkpoint_note: str | bytes, verifier: NoteVerifier,
               trusted_note: str | bytes | None = None) -> VerifiedLog:
    """Run the plan in the module docstring. `entries` is called once more to pinpoint a failure."""
    # 1
    checkpoint = open_checkpoint(checkpoint_note, verifier)
    trusted = _open_trusted(trusted_note, verifier) if trusted_note is not None else None
    # 2 and 3 in one streaming pass: O(log n) memory for any log size.
    tree = CompactRange()
    signed_root = trusted_root = None
    prev, linked = GENESIS_PREV.encode(), True
    chains = AccountChains()
    for data in entries():
        if tree.size == checkpoint.size:
            signed_root = tree.root()
        if trusted is not None and tree.size == trusted.size:
            trusted_root = tree.root()
        h = _LEAF_PREFIX.copy()
        h.update(data)
        leaf = h.digest()
        if tree.size < checkpoint.size:
            seq, entry_prev = chain_link(data)
        else:  # unsigned: only a full parse vouches for its form
            try:
                entry = parse_entry(data, tree.size)
                seq, entry_prev = entry["seq"], entry["prev"].encode()
            except EntryError:
                seq, entry_prev = -1, b""  # check_chain below reports the first defect
        linked = linked and seq == tree.size and entry_prev == prev
        if linked:  # a broken hash chain is reported first, below, by check_chain
            chains.check(data, tree.size)
        prev = leaf.hex().encode()
        tree.append(leaf)
    if tree.size == checkpoint.size:
        signed_root = tree.root()
    if trusted is not None and tree.size == trusted.size:
        trusted_root = tree.root()
    if signed_root != checkpoint.root or not linked:
        check_chain(entries())  # raises at the first defective entry, if one is visible
        if tree.size < checkpoint.size:
            raise EntryError(tree.size, f"missing: the checkpoint covers {checkpoint.size} entries but the "
                                        f"export ends after {tree.size} (truncated)")
        raise EntryError(max(checkpoint.size - 1, 0), "the entries do not hash to the signed checkpoint root "
                                                      "(this entry was edited, or the chain was rewritten up to here)")
    # 4
    if trusted is not None:
        if trusted.size > checkpoint.size:
            raise EntryError(checkpoint.size, f"rolled back: the trusted checkpoint covers {trusted.size} "
                                              f"entries, this log only {checkpoint.size}")
        if trusted_root != trusted.root:
            raise EntryError(max(trusted.size - 1, 0), f"forked: the first {trusted.size} entries differ "
                                                       "from the trusted checkpoint")
    return VerifiedLog(size=checkpoint.size, root=checkpoint.root, checkpoint=checkpoint,
                       unsigned_trailing=tree.size - checkpoint.size)


# -- from C2SP tlog-tiles ---------------------------------------------------------------------

@dataclass(frozen=True)
class VerifiedTiles:
    size: int
    root: bytes
    checkpoint: Checkpoint
    note: str
    old_size: int  # verified before (from --state); only [old_size, size) was hashed this time
    last_leaf: bytes
    cosignatures: tuple[Cosignature, ...]
    chains: AccountChains | None  # None: the account chains of the new entries were not checked (see TileState)


def verify_tiles(read: Callable[[str], bytes], verifier: NoteVerifier, *,
                 witnesses: Sequence[CosignatureVerifier] = (), quorum: int = 0, state: TileState | None = None,
                 progress: Callable[[int], None] = lambda done: None) -> VerifiedTiles:
    """Verify the published log from its tiles, from `state` (a size verified before) to its checkpoint.

    Steps as in `auditlog.tiles`: open the checkpoint with the log key and the
    witness quorum, then check entries and tiles of the new range only, and
    that the tree verified before is a prefix of this one (rollback, fork).
    """
    try:
        note = read(CHECKPOINT_PATH).decode("utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"no {CHECKPOINT_PATH} at the tiles location") from None
    except UnicodeDecodeError:
        raise CheckpointError("checkpoint is not UTF-8") from None
    checkpoint, cosigs = open_cosigned_checkpoint(note, verifier, witnesses, quorum)
    if state is not None and state.origin != checkpoint.origin:
        raise CheckpointError(f"the state file is for log {state.origin!r}, this is {checkpoint.origin!r}")
    if state is not None:  # what it says it verified must be what a checkpoint of this log signed
        try:
            saved = open_checkpoint(state.note, verifier)
        except VerificationError as exc:
            raise StateFileError(None, f"its checkpoint does not verify under this key ({exc})") from None
        if (saved.size, saved.root) != (state.size, state.root):
            raise StateFileError(None, "its size and root are not those its checkpoint signed")
    old = state or TileState(origin=checkpoint.origin, size=0, root=b"", last_leaf=b"", note="",
                             chains=AccountChains())
    # The account chains continue from the heads the state file remembers (a state file written
    # before it remembered them cannot vouch for them: the new entries' chains go unchecked).
    chains = AccountChains() if old.size == 0 else \
        old.chains and AccountChains(old.chains.heads, old.chains.first_chained)  # a copy: `state` stays as it was
    result = verify_range(read, old_size=old.size, old_root=old.root, old_last_leaf=old.last_leaf,
                          size=checkpoint.size, root=checkpoint.root, progress=progress, chains=chains)
    return VerifiedTiles(size=checkpoint.size, root=checkpoint.root, checkpoint=checkpoint, note=note,
                         old_size=old.size, last_leaf=result.last_leaf, cosignatures=tuple(cosigs), chains=chains)


@dataclass(frozen=True)
class TileState:
    """What `--state` remembers: the last checkpoint verified, its root and last leaf hash, and
    each account's access-chain head there (one line per account), so that the next run checks the
    new entries' account chains too. `chains` is None for a state file written without them."""

    origin: str
    size: int
    root: bytes
    last_leaf: bytes
    note: str
    chains: AccountChains | None

    @classmethod
    def load(cls, path: Path) -> TileState | None:
        """The state `save` wrote, or None if there is none yet. Anything else in the file (edited,
        truncated, another program's) raises `StateFileError`: a state file is trusted input, so a
        value that is not what `save` writes is refused, never coerced."""
        if not path.exists():
            return None
        try:
            raw = json.loads(path.read_bytes().decode("utf-8"))
        except (ValueError, RecursionError) as exc:  # RecursionError: nesting too deep to parse
            raise StateFileError(path, f"not JSON ({type(exc).__name__})") from None
        try:
            return cls._parse(raw)
        except StateFileError as exc:
            raise StateFileError(path, exc.what) from None

    @classmethod
    def _parse(cls, raw: object) -> TileState:
        _need(isinstance(raw, dict), "not a JSON object")
        assert isinstance(raw, dict)
        origin, size, note = raw.get("origin"), raw.get("size"), raw.get("checkpoint")
        _need(isinstance(origin, str) and origin != "", "origin is not a log name")
        _need(_is_count(size), "size is not a whole number >= 0")
        assert isinstance(origin, str) and isinstance(size, int)
        _need(isinstance(note, str), "checkpoint is not a note")
        assert isinstance(note, str)
        root, last_leaf = _hash_field(raw, "root", size), _hash_field(raw, "last_leaf", size)
        chains = None
        if "account_chains" in raw:
            saved = raw["account_chains"]
            _need(isinstance(saved, dict) and set(saved) == {"first_chained", "heads"},
                  "account_chains is not {first_chained, heads}")
            first, heads = saved["first_chained"], saved["heads"]
            _need(first is None or _is_count(first) and first < size,
                  "account_chains.first_chained is not null or an entry index below size")
            _need(isinstance(heads, dict), "account_chains.heads is not an object")
            _need(first is not None or not heads, "account_chains has heads but no first_chained")
            parsed: dict[str, tuple[int, str]] = {}
            for ref, head in heads.items():
                _need(isinstance(head, list) and len(head) == 2 and _is_count(head[0]) and 0 < head[0] <= size
                      and _is_hex_hash(head[1]), f"account_chains.heads[{ref!r}] is not [account_seq, hash]")
                parsed[ref] = (head[0], head[1])
            chains = AccountChains(parsed, first)
        return cls(origin=origin, size=size, root=root, last_leaf=last_leaf, note=note, chains=chains)

    def save(self, path: Path) -> None:
        value: dict[str, object] = {"origin": self.origin, "size": self.size, "root": self.root.hex(),
                                    "last_leaf": self.last_leaf.hex(), "checkpoint": self.note}
        if self.chains is not None:
            value["account_chains"] = {"first_chained": self.chains.first_chained,
                                       "heads": {ref: [seq, h] for ref, (seq, h) in sorted(self.chains.heads.items())}}
        write_durably(path, json.dumps(value, indent=1).encode())


class StateFileError(ValueError):
    """A --state file that is not what `TileState.save` wrote."""

    def __init__(self, path: Path | None, what: str) -> None:
        super().__init__(f"the state file {path} is unusable: {what}" if path else what)
        self.what = what


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise StateFileError(None, what)


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0  # not bool, not float, not a numeric string


def _is_hex_hash(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _hash_field(raw: dict[str, object], name: str, size: int) -> bytes:
    """A SHA-256 in lowercase hex; empty for an empty log's last_leaf."""
    value = raw.get(name)
    if name == "last_leaf" and size == 0 and value == "":
        return b""
    _need(_is_hex_hash(value), f"{name} is not a SHA-256 in hex")
    assert isinstance(value, str)
    return bytes.fromhex(value)
