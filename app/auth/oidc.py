"""OpenID Connect sign-in (authorization-code flow with PKCE): the identity provider is one outside system."""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import urlencode

import httpx
import jwt

from app.config import Settings
from app.errors import Unauthorized, Upstream

# Asymmetric algorithms only: an HS256 token would be "signed" with the client secret anyone at the IdP may know.
ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"]


class SignInFailed(Unauthorized):
    code = "sign_in_failed"


@dataclass(frozen=True)
class Provider:
    """What the issuer's discovery document says about it."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str


@dataclass(frozen=True)
class AuthRequest:
    """Where to send the browser, and what to remember in the session until it comes back."""

    url: str
    state: str
    nonce: str
    verifier: str


@lru_cache(maxsize=8)
def discover(issuer: str, timeout_s: float) -> Provider:
    """The issuer's endpoints from /.well-known/openid-configuration (cached once it has answered)."""
    url = issuer.rstrip("/") + "/.well-known/openid-configuration"
    try:
        doc = httpx.get(url, timeout=timeout_s).raise_for_status().json()
    except (httpx.HTTPError, ValueError) as exc:
        raise Upstream(f"the sign-in provider did not answer at {url}: {exc}") from exc
    if doc.get("issuer") != issuer:
        raise Upstream(f"the sign-in provider calls itself {doc.get('issuer')!r}, not {issuer!r}")
    return Provider(
        issuer=issuer,
        authorization_endpoint=str(doc["authorization_endpoint"]),
        token_endpoint=str(doc["token_endpoint"]),
        jwks_uri=str(doc["jwks_uri"]),
    )


@lru_cache(maxsize=8)
def _jwks(jwks_uri: str, timeout_s: float) -> jwt.PyJWKClient:
    return jwt.PyJWKClient(jwks_uri, cache_keys=True, lifespan=3600, timeout=int(max(1, timeout_s)))


def _challenge(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def start(settings: Settings, *, redirect_uri: str) -> AuthRequest:
    """An authorization request with fresh state, nonce and PKCE verifier."""
    provider = discover(settings.oidc_issuer, settings.oidc_timeout_s)
    state, nonce, verifier = secrets.token_urlsafe(24), secrets.token_urlsafe(24), secrets.token_urlsafe(48)
    query = urlencode(
        {
            "response_type": "code",
            "client_id": settings.oidc_client_id,
            "redirect_uri": redirect_uri,
            "scope": settings.oidc_scopes,
            "state": state,
            "nonce": nonce,
            "code_challenge": _challenge(verifier),
            "code_challenge_method": "S256",
        }
    )
    sep = "&" if "?" in provider.authorization_endpoint else "?"
    return AuthRequest(
        url=f"{provider.authorization_endpoint}{sep}{query}", state=state, nonce=nonce, verifier=verifier
    )


def _exchange(settings: Settings, provider: Provider, *, code: str, redirect_uri: str, verifier: str) -> str:
    secret = settings.oidc_client_secret.get_secret_value()
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri,
        "client_id": settings.oidc_client_id,
        "code_verifier": verifier,
    }
    auth = httpx.BasicAuth(settings.oidc_client_id, secret) if secret else None
    try:
        resp = httpx.post(provider.token_endpoint, data=form, auth=auth, timeout=settings.oidc_timeout_s)
    except httpx.HTTPError as exc:
        raise Upstream(f"the sign-in provider's token endpoint did not answer: {exc}") from exc
    if resp.status_code != 200:
        raise SignInFailed(f"the sign-in provider refused the sign-in ({resp.status_code})")
    try:
        return str(resp.json()["id_token"])
    except (ValueError, KeyError) as exc:
        raise SignInFailed("the sign-in provider sent no ID token") from exc


def finish(settings: Settings, *, code: str, redirect_uri: str, verifier: str, nonce: str) -> dict[str, Any]:
    """Trade the code for an ID token and verify it (signature from the JWKS, issuer, audience, expiry, nonce)."""
    provider = discover(settings.oidc_issuer, settings.oidc_timeout_s)
    id_token = _exchange(settings, provider, code=code, redirect_uri=redirect_uri, verifier=verifier)
    try:
        key = _jwks(provider.jwks_uri, settings.oidc_timeout_s).get_signing_key_from_jwt(id_token)
        claims: dict[str, Any] = jwt.decode(
            id_token,
            key.key,
            algorithms=ALGORITHMS,
            audience=settings.oidc_client_id,
            issuer=provider.issuer,
            leeway=30,
            options={"require": ["exp", "iat", "iss", "aud", "sub"]},
        )
    except jwt.PyJWKClientConnectionError as exc:
        raise Upstream(f"the sign-in provider's keys could not be fetched: {exc}") from exc
    except jwt.PyJWTError as exc:
        raise SignInFailed(f"the ID token is not valid: {exc}") from exc
    if not isinstance(claims.get("nonce"), str) or not secrets.compare_digest(claims["nonce"], nonce):
        raise SignInFailed("the ID token does not answer this sign-in (nonce mismatch)")
    return claims
