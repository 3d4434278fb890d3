"""A tiny OpenID Connect issuer over real HTTP on loopback: discovery, JWKS, authorize and token endpoints.

It signs ID tokens with an RSA key it generates, checks the client secret and the PKCE verifier, and can be
told to misbehave (other key, other audience, expired, wrong nonce, HS256) so the tests see every refusal.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlparse

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa


@dataclass
class Grant:
    client_id: str
    redirect_uri: str
    nonce: str
    challenge: str
    username: str


@dataclass
class FakeIssuer:
    client_id: str = "retrotest"
    client_secret: str = "s3cret-of-the-client"
    username: str = "sso-user"
    subject: str = "8c1f-sso-user"
    # Ways to misbehave, set by tests.
    claims_override: dict[str, Any] = field(default_factory=dict)
    sign_with_other_key: bool = False
    hs256_with_client_secret: bool = False
    key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    other_key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    grants: dict[str, Grant] = field(default_factory=dict)
    token_requests: int = 0

    def start(self) -> FakeIssuer:
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                issuer._get(self)

            def do_POST(self) -> None:
                issuer._post(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}/realms/test"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # --- endpoints ---

    def _send(self, h: BaseHTTPRequestHandler, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _get(self, h: BaseHTTPRequestHandler) -> None:
        url = urlparse(h.path)
        path = url.path.removeprefix("/realms/test")
        if path == "/.well-known/openid-configuration":
            self._send(
                h,
                200,
                {
                    "issuer": self.url,
                    "authorization_endpoint": f"{self.url}/protocol/openid-connect/auth",
                    "token_endpoint": f"{self.url}/protocol/openid-connect/token",
                    "jwks_uri": f"{self.url}/protocol/openid-connect/certs",
                    "response_types_supported": ["code"],
                    "id_token_signing_alg_values_supported": ["RS256"],
                },
            )
        elif path == "/protocol/openid-connect/certs":
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
            self._send(h, 200, {"keys": [{**jwk, "kid": "test-key", "alg": "RS256", "use": "sig"}]})
        elif path == "/protocol/openid-connect/auth":
            self._authorize(h, {k: v[0] for k, v in parse_qs(url.query).items()})
        else:
            self._send(h, 404, {"error": "not_found"})

    def _authorize(self, h: BaseHTTPRequestHandler, q: dict[str, str]) -> None:
        """Sign the user in at once (a real IdP would ask for a password) and send the browser back."""
        if q.get("client_id") != self.client_id or q.get("response_type") != "code":
            self._send(h, 400, {"error": "invalid_request"})
            return
        if q.get("code_challenge_method") != "S256" or not q.get("code_challenge"):
            self._send(h, 400, {"error": "invalid_request", "error_description": "PKCE required"})
            return
        code = secrets.token_urlsafe(16)
        self.grants[code] = Grant(q["client_id"], q["redirect_uri"], q["nonce"], q["code_challenge"], self.username)
        h.send_response(302)
        h.send_header("Location", f"{q['redirect_uri']}?{urlencode({'code': code, 'state': q['state']})}")
        h.send_header("Content-Length", "0")
        h.end_headers()

    def _post(self, h: BaseHTTPRequestHandler) -> None:
        if urlparse(h.path).path != "/realms/test/protocol/openid-connect/token":
            self._send(h, 404, {"error": "not_found"})
            return
        self.token_requests += 1
        length = int(h.headers.get("Content-Length", "0"))
        form = {k: v[0] for k, v in parse_qs(h.rfile.read(length).decode()).items()}
        expected = base64.b64encode(f"{self.client_id}:{self.client_secret}".encode()).decode()
        if h.headers.get("Authorization") != f"Basic {expected}":
            self._send(h, 401, {"error": "invalid_client"})
            return
        grant = self.grants.pop(form.get("code", ""), None)
        if (
            grant is None
            or form.get("grant_type") != "authorization_code"
            or form.get("redirect_uri") != grant.redirect_uri
        ):
            self._send(h, 400, {"error": "invalid_grant"})
            return
        verifier = form.get("code_verifier", "")
        digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        if digest != grant.challenge:
            self._send(h, 400, {"error": "invalid_grant", "error_description": "PKCE verifier does not match"})
            return
        self._send(h, 200, {"access_token": "opaque", "token_type": "Bearer", "id_token": self._id_token(grant)})

    def _id_token(self, grant: Grant) -> str:
        now = int(time.time())
        claims = {
            "iss": self.url,
            "sub": self.subject,
            "aud": grant.client_id,
            "iat": now,
            "exp": now + 300,
            "nonce": grant.nonce,
            "preferred_username": grant.username,
            **self.claims_override,
        }
        if self.hs256_with_client_secret:
            return jwt.encode(claims, self.client_secret, algorithm="HS256", headers={"kid": "test-key"})
        key = self.other_key if self.sign_with_other_key else self.key
        return jwt.encode(claims, key, algorithm="RS256", headers={"kid": "test-key"})
