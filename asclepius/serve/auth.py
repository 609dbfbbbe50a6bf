"""Clients' key: read once where the server starts (a missing or empty configured key stops it: failing open would
serve clinical text to anyone), kept only as a SHA-256 digest, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import os

from asclepius.config import ServeConfig


class ServeConfigError(ValueError):
    pass


def read_serve_key(cfg: ServeConfig) -> str | None:
    """The clients' key, or None when auth is off. A configured key source that is missing or empty stops the
    server at start: failing open would serve clinical text to anyone."""
    if cfg.api_key_file:
        try:
            with open(os.path.expanduser(cfg.api_key_file), encoding="utf-8") as f:
                key = f.read().strip()
        except OSError as err:
            raise ServeConfigError(f"serve.api_key_file: cannot read {cfg.api_key_file} ({type(err).__name__}); refusing to serve without the key") from None
        if not key:
            raise ServeConfigError(f"serve.api_key_file: {cfg.api_key_file} is empty; refusing to serve without a key")
        return key
    if cfg.api_key_env:
        key = os.environ.get(cfg.api_key_env, "").strip()
        if not key:
            raise ServeConfigError(f"serve.api_key_env: the environment variable {cfg.api_key_env} is not set or empty; refusing to "
                                   "serve without the key it names")  # fmt: skip
        return key
    return None



def key_digest(key: str | None) -> str | None:
    """What leaves the process that read the key: its SHA-256, never the key."""
    return hashlib.sha256(key.encode()).hexdigest() if key else None


def bearer_matches(authorization: str, key_sha256: str | None) -> bool:
    """An `Authorization: Bearer <key>` header against the digest; no key configured means auth is off."""
    if not key_sha256:
        return True
    token = authorization[7:] if authorization.lower().startswith("bearer ") else ""
    return hmac.compare_digest(hashlib.sha256(token.encode()).hexdigest(), key_sha256)
