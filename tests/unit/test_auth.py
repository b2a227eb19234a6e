"""Authentication: HS256 and RS256 JWTs, the dev-mode token form, and every way a token can be wrong."""

from __future__ import annotations

import hashlib
import hmac
import json
import time

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from copilot.runtime.auth import (
    AccessPolicy,
    Authenticator,
    AuthError,
    AuthSettings,
    Principal,
    Role,
    ServiceIdentity,
    mint_token,
)

SECRET = "unit-test-secret-0123456789-abcdefghij"


@pytest.fixture(scope="module")
def rsa_keys(tmp_path_factory):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    path = tmp_path_factory.mktemp("keys") / "jwt.pub"
    path.write_text(public)
    return private, public, path


def authenticator(**kw) -> Authenticator:
    return Authenticator(AuthSettings(**{"mode": "jwt", "jwt_secret": SECRET, **kw}))


def refused(auth: Authenticator, header: str | None) -> AuthError:
    with pytest.raises(AuthError) as caught:
        auth.authenticate(header)
    assert caught.value.code is grpc.StatusCode.UNAUTHENTICATED
    return caught.value


def test_hs256_token_gives_subject_and_role():
    principal = authenticator().authenticate(f"Bearer {mint_token('anna', Role.ENGINEER, secret=SECRET)}")
    assert (principal.subject, principal.role, principal.dev) == ("anna", Role.ENGINEER, False)


def test_rs256_token_is_checked_with_the_public_key(rsa_keys):
    private, _, public_path = rsa_keys
    auth = Authenticator(AuthSettings(mode="jwt", jwt_secret="", jwt_public_key_file=public_path))
    principal = auth.authenticate(f"Bearer {mint_token('mes-line-4', Role.TECHNICIAN, private_key=private)}")
    assert principal.subject == "mes-line-4"
    assert "not accepted" in refused(auth, f"Bearer {mint_token('x', Role.ADMIN, secret=SECRET)}").message


def test_algorithm_confusion_and_alg_none_are_refused(rsa_keys):
    _private, public, public_path = rsa_keys
    auth = Authenticator(AuthSettings(mode="jwt", jwt_secret="", jwt_public_key_file=public_path))
    claims = {
        "sub": "eve",
        "role": "admin",
        "exp": int(time.time()) + 60,
        "iss": "manufacturing-copilot",
        "aud": "manufacturing-copilot",
    }
    unsigned = jwt.encode(claims, None, algorithm="none")
    assert "not accepted" in refused(auth, f"Bearer {unsigned}").message
    # HS256 "signed" with the public key text (the classic confusion attack), built by hand: PyJWT refuses
    # to sign with a PEM key as an HMAC secret
    header = jwt.utils.base64url_encode(b'{"alg":"HS256","typ":"JWT"}').decode()
    body = jwt.utils.base64url_encode(json.dumps(claims).encode()).decode()
    signature = jwt.utils.base64url_encode(
        hmac.new(public.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest()
    ).decode()
    assert "not accepted" in refused(auth, f"Bearer {header}.{body}.{signature}").message


@pytest.mark.parametrize(
    "header, fragment",
    [
        (None, "missing"),
        ("", "missing"),
        ("Basic dXNlcjpwdw==", "malformed"),
        ("Bearer", "malformed"),
        ("Bearer not.a.jwt", "invalid token"),
        ("Bearer technician-7", "invalid token"),  # the dev form is refused outside dev mode
    ],
)
def test_malformed_headers(header, fragment):
    assert fragment in refused(authenticator(), header).message


def test_expired_forged_and_foreign_tokens_are_refused():
    auth = authenticator()
    assert (
        "expired"
        in refused(auth, f"Bearer {mint_token('a', Role.ADMIN, secret=SECRET, now=time.time() - 7200)}").message
    )
    other = "some-other-secret-that-is-long-enough-0123"
    assert "invalid token" in refused(auth, f"Bearer {mint_token('a', Role.ADMIN, secret=other)}").message
    assert "invalid token" in refused(auth, f"Bearer {mint_token('a', Role.ADMIN, secret=SECRET, issuer='x')}").message
    assert (
        "invalid token" in refused(auth, f"Bearer {mint_token('a', Role.ADMIN, secret=SECRET, audience='x')}").message
    )
    no_role = jwt.encode(
        {"sub": "a", "exp": int(time.time()) + 60, "iss": "manufacturing-copilot", "aud": "manufacturing-copilot"},
        SECRET,
        algorithm="HS256",
    )
    assert "invalid token" in refused(auth, f"Bearer {no_role}").message
    bad_role = jwt.encode(
        {
            "sub": "a",
            "role": "root",
            "exp": int(time.time()) + 60,
            "iss": "manufacturing-copilot",
            "aud": "manufacturing-copilot",
        },
        SECRET,
        algorithm="HS256",
    )
    assert "role" in refused(auth, f"Bearer {bad_role}").message


def test_clock_skew_within_leeway_is_tolerated():
    token = mint_token("a", Role.TECHNICIAN, secret=SECRET, ttl_s=60, now=time.time() - 75)  # expired 15 s ago
    assert authenticator(leeway_s=30).authenticate(f"Bearer {token}").subject == "a"
    refused(authenticator(leeway_s=0), f"Bearer {token}")


def test_dev_mode_accepts_the_seed_form_as_technician_only():
    auth = Authenticator(AuthSettings(mode="dev", jwt_secret=SECRET))
    principal = auth.authenticate("Bearer technician-42")
    assert (principal.subject, principal.role, principal.dev) == ("technician-42", Role.TECHNICIAN, True)
    assert auth.authenticate(f"Bearer {mint_token('boss', Role.ADMIN, secret=SECRET)}").role is Role.ADMIN
    refused(auth, "Bearer admin-1")  # the dev form never grants more than technician


def test_misconfiguration_fails_at_start_not_at_first_call():
    with pytest.raises(ValueError, match="AUTH_MODE=jwt needs"):
        Authenticator(AuthSettings(mode="jwt", jwt_secret=""))
    with pytest.raises(ValueError, match="at least 32"):
        Authenticator(AuthSettings(mode="jwt", jwt_secret="short"))


def test_secret_from_a_mounted_file(tmp_path):
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")
    auth = Authenticator(AuthSettings(mode="jwt", jwt_secret="", jwt_secret_file=path))
    assert auth.authenticate(f"Bearer {mint_token('a', Role.ADMIN, secret=SECRET)}").role is Role.ADMIN


def test_roles_are_ordered_and_the_policy_names_the_lowest_role_a_method_needs():
    policy = AccessPolicy(methods={"/copilot.agents.v1.KnowledgeService/DeleteDocument": Role.ADMIN})
    assert policy.required("/copilot.agents.v1.KnowledgeService/DeleteDocument") is Role.ADMIN
    assert policy.required("/copilot.agents.v1.KnowledgeService/Advise") is Role.TECHNICIAN
    assert Role.ADMIN > Role.ENGINEER > Role.TECHNICIAN > Role.SERVICE  # a service passes no role check


def test_mint_refuses_subjects_that_would_not_authenticate():
    with pytest.raises(ValueError):
        mint_token("has spaces", Role.TECHNICIAN, secret=SECRET)


def test_a_verified_token_is_remembered_until_it_expires(monkeypatch):
    auth = authenticator(leeway_s=0)
    token = f"Bearer {mint_token('anna', Role.ENGINEER, secret=SECRET, ttl_s=1)}"
    calls = []
    real_decode = jwt.decode
    monkeypatch.setattr(jwt, "decode", lambda *a, **kw: calls.append(1) or real_decode(*a, **kw))
    assert auth.authenticate(token).subject == auth.authenticate(token).subject == "anna"
    assert len(calls) == 1  # verified once
    time.sleep(1.2)
    assert "expired" in refused(auth, token).message  # not served from memory past its exp
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    assert refused(auth, forged).code is grpc.StatusCode.UNAUTHENTICATED  # a different string is verified anew


def test_a_token_that_lives_too_long_is_refused():
    auth = authenticator(max_token_lifetime_s=3600)
    assert auth.authenticate(f"Bearer {mint_token('anna', Role.TECHNICIAN, secret=SECRET, ttl_s=3000)}")
    forever = mint_token("mallory", Role.TECHNICIAN, secret=SECRET, ttl_s=2**40 - time.time())
    assert "longer than a token may live" in refused(auth, f"Bearer {forever}").message


def test_a_hostile_token_header_is_not_echoed_whole():
    header = jwt.utils.base64url_encode(json.dumps({"alg": "X" * 6000 + "\x1b[31m", "typ": "JWT"}).encode()).decode()
    body = jwt.utils.base64url_encode(b'{"sub":"eve"}').decode()
    message = refused(authenticator(), f"Bearer {header}.{body}.c2ln").message
    assert len(message) < 200 and "\x1b" not in message


ADVISE = "/copilot.agents.v1.KnowledgeService/Advise"
LIST = "/copilot.agents.v1.KnowledgeService/ListDocuments"
DELETE = "/copilot.agents.v1.KnowledgeService/DeleteDocument"
AGENT_POLICY = AccessPolicy(methods={DELETE: Role.ADMIN}, internal=frozenset({ADVISE}))


@pytest.mark.parametrize("role", [Role.TECHNICIAN, Role.ENGINEER, Role.ADMIN])
def test_an_agents_internal_work_takes_only_a_service_token(role):
    user = Principal("eve", role)
    refusal = AGENT_POLICY.refusal(user, ADVISE)
    assert refusal is not None and "service token" in refusal and "CopilotService" in refusal
    assert AGENT_POLICY.refusal(Principal("orchestrator", Role.SERVICE), ADVISE) is None
    # configured otherwise (AUTH_AGENT_CALLERS=any): a user may call it directly
    assert AGENT_POLICY.refusal(user, ADVISE, users_may_call_internal=True) is None


def test_a_service_token_reads_but_never_passes_a_role_check():
    service = Principal("orchestrator", Role.SERVICE)
    assert AGENT_POLICY.refusal(service, LIST) is None  # what any user may call (the orchestrator's listings)
    assert "admin" in (AGENT_POLICY.refusal(service, DELETE) or "")
    assert AGENT_POLICY.refusal(Principal("root", Role.ADMIN), DELETE) is None
    assert AGENT_POLICY.refusal(Principal("tom", Role.TECHNICIAN), DELETE) is not None


def test_the_orchestrator_mints_its_service_token_and_renews_it(monkeypatch):
    settings = AuthSettings(mode="jwt", jwt_secret=SECRET, max_token_lifetime_s=600)
    identity = ServiceIdentity("orchestrator", settings)
    header = identity.header()
    principal = Authenticator(settings).authenticate(header)
    assert (principal.subject, principal.role, principal.is_service) == ("orchestrator", Role.SERVICE, True)
    claims = jwt.decode(header.removeprefix("Bearer "), SECRET, algorithms=["HS256"], audience=settings.audience)
    assert claims["exp"] - claims["iat"] == 600  # never longer than a token may live
    assert identity.header() == header  # the same token until its half-life
    later = time.time() + 301
    monkeypatch.setattr(time, "time", lambda: later)
    assert identity.header() != header


def test_a_service_token_from_a_mounted_file_is_reread_when_rotated(tmp_path, rsa_keys):
    private, _public, public_path = rsa_keys
    path = tmp_path / "service-token"
    path.write_text(mint_token("orchestrator", Role.SERVICE, private_key=private) + "\n")
    settings = AuthSettings(mode="jwt", jwt_secret="", jwt_public_key_file=public_path, service_token_file=path)
    identity = ServiceIdentity("orchestrator", settings)
    first = identity.header()
    assert Authenticator(settings).authenticate(first).is_service
    path.write_text(mint_token("orchestrator-2", Role.SERVICE, private_key=private))
    assert Authenticator(settings).authenticate(identity.header()).subject == "orchestrator-2"


def test_without_a_way_to_sign_or_a_token_file_the_service_refuses_to_start(rsa_keys):
    _private, _public, public_path = rsa_keys
    with pytest.raises(ValueError, match="AUTH_SERVICE_TOKEN_FILE"):
        ServiceIdentity("orchestrator", AuthSettings(mode="jwt", jwt_secret="", jwt_public_key_file=public_path))
