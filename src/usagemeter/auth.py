"""API keys: issue, hash, verify, scopes, and the tenancy rules every endpoint applies.

A key is a random secret shown once. Only its SHA-256 is stored: the secret has 192 bits of
entropy, so a slow password hash would add latency to every request and no safety. A key is
found by the first bytes of that digest (an index lookup) and accepted only after the whole
digest compares equal in constant time, so response timing says nothing about a near miss.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from usagemeter.model import ApiKey, Scope
from usagemeter.store.base import NotFound, Store
from usagemeter.store.rows import LOOKUP_BYTES

KEY_ID_PATTERN = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
PREFIX_PATTERN = re.compile(r"^[A-Za-z0-9_\-]{0,16}$")
DEFAULT_PREFIX = "um_"


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


def new_key_id() -> str:
    # 128 random bits: a key id names a credential in events and paths, so it must not be
    # guessable, and ids are global, so a caller can never collide with another tenant's.
    return "key_" + secrets.token_hex(16)


def issue_key(
    store: Store,
    account_id: str | None,
    *,
    name: str = "",
    prefix: str = DEFAULT_PREFIX,
    scopes: Iterable[Scope] = (Scope.READ,),
    key_id: str | None = None,
    secret: str | None = None,
) -> tuple[ApiKey, str]:
    """Create a key and return it with its secret, which is never stored or shown again.
    ``secret`` is for reproducible demo data only; real keys get a random one."""
    if not PREFIX_PATTERN.match(prefix):
        raise ValueError("prefix: up to 16 letters, digits, '_' or '-'")
    if key_id is not None and not KEY_ID_PATTERN.match(key_id):
        raise ValueError("id: 1 to 64 letters, digits, '_' or '-'")
    scope_set = frozenset(scopes)
    if (Scope.OPERATOR in scope_set) != (account_id is None):
        raise ValueError("an operator key belongs to no account; an account key is not operator")
    secret = secret or prefix + secrets.token_urlsafe(24)
    key = ApiKey(
        id=key_id or new_key_id(),
        account_id=account_id,
        name=name,
        prefix=prefix,
        scopes=scope_set,
        created_at=datetime.now(UTC),
    )
    return store.create_key(key, hash_secret(secret)), secret


def authenticate(store: Store, secret: str | None) -> ApiKey | None:
    """The live key whose secret this is (a live portal token stands for a read key of its
    account), or None. Remembers for the request which metrics the caller may read."""
    key = _live_key(store, secret)
    if key is None and secret:
        key = _token_key(store, secret)
    _restrict_to(key)
    return key


def _token_key(store: Store, secret: str) -> ApiKey | None:
    # Here, not at the top: portal.py builds on this module's hashing.
    from usagemeter import portal

    return portal.authenticate_token(store, secret)


def _restrict_to(key: ApiKey | None) -> None:
    from usagemeter import portal

    portal.restrict_to(key)


def _live_key(store: Store, secret: str | None) -> ApiKey | None:
    if not secret:
        return None
    digest = hash_secret(secret)
    for key, stored in store.find_keys_by_lookup(digest[:LOOKUP_BYTES]):
        if hmac.compare_digest(digest, stored) and key.revoked_at is None:
            return key
    return None


@dataclass(frozen=True, slots=True)
class Caller:
    """A request's key (None: no valid credential), the SHA-256 of the secret it sent, and
    whether the key came from a ``KeyCache`` (so is unchecked since it was cached)."""

    key: ApiKey | None
    digest: bytes | None
    cached: bool


class KeyCache:
    """Keys that authenticated before, by the SHA-256 of their secret, for a caller that
    has the key checked again where it matters: a batch sent to a store that stores it only
    if its key still stands at commit (``SQLiteStore.submit``). The lookup it spares was a
    fifth of the event loop's work for one-event requests. Only live keys are kept; a secret
    seen for the first time, a portal token or a revoked key always goes to the store. (The
    dictionary compares digests, not secrets: its timing says nothing useful about one.)"""

    SIZE = 1024  # keys; past it the cache starts again: more keys than this is unusual

    def __init__(self) -> None:
        self._keys: dict[bytes, ApiKey] = {}

    def authenticate(self, store: Store, secret: str | None) -> Caller:
        """Who sends ``secret``: ``authenticate``'s key, from this cache when it holds it."""
        if not secret:
            return Caller(authenticate(store, secret), None, cached=False)
        digest = hash_secret(secret)
        key = self._keys.get(digest)
        if key is not None:
            _restrict_to(key)
            return Caller(key, digest, cached=True)
        key = _live_key(store, secret)
        if key is not None:
            if len(self._keys) >= self.SIZE:
                self._keys.clear()
            self._keys[digest] = key
        else:  # a portal token (never cached: it expires), or no credential at all
            key = _token_key(store, secret)
        _restrict_to(key)
        return Caller(key, digest, cached=False)

    def forget(self, digest: bytes) -> None:
        self._keys.pop(digest, None)


def can_read(store: Store, key: ApiKey, account_id: str) -> bool:
    """An operator reads everything; a read key reads its own account and every account
    below it, never a parent or a sibling. An unknown account is simply not readable, so the
    caller cannot tell it from another tenant's."""
    if key.is_operator:
        return _exists(store, account_id)
    return Scope.READ in key.scopes and in_tenancy(store, key, account_id)


def can_ingest(key: ApiKey, account_id: str) -> bool:
    """An operator sends events for any account; an ingest key for its own account only."""
    if key.is_operator:
        return True
    return Scope.INGEST in key.scopes and key.account_id == account_id


def can_manage(store: Store, key: ApiKey, account_id: str) -> bool:
    """An operator manages every account's keys; a manage key those of its own account and
    every account below it. An unknown account is not manageable, like another tenant's."""
    if key.is_operator:
        return _exists(store, account_id)
    return Scope.MANAGE in key.scopes and in_tenancy(store, key, account_id)


def in_tenancy(store: Store, key: ApiKey, account_id: str) -> bool:
    """True when ``account_id`` is the key's own account or below it, whatever its scopes."""
    if key.account_id is None:
        return False
    try:
        return key.account_id in store.ancestors(account_id)
    except NotFound:
        return False


def _exists(store: Store, account_id: str) -> bool:
    try:
        store.get_account(account_id)
    except NotFound:
        return False
    return True


def grantable(caller: ApiKey, scopes: Iterable[Scope]) -> bool:
    """A key never mints more than it holds: an operator grants any account scope, a manage
    key only scopes it holds itself. Nobody grants operator through an account key."""
    wanted = frozenset(scopes)
    if Scope.OPERATOR in wanted:
        return False
    return caller.is_operator or wanted <= caller.scopes


def can_see_key(store: Store, caller: ApiKey, key: ApiKey) -> bool:
    """A key is visible to operators and to readers of the account it belongs to."""
    if caller.is_operator:
        return True
    return key.account_id is not None and can_read(store, caller, key.account_id)
