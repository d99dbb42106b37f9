"""Access: who may use pacsbridge over HTTP. Users and service clients of the built-in token
issuer (argon2 hashes), its signing keys (ES256, published as a JWKS), OAuth2 access tokens
(JWT) and what each role may do. Sits on ``archive`` and ``config`` (DESIGN.md's layers); the
HTTP wiring is ``pacsbridge``'s."""
