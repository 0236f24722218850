"""Signing an artifact, and checking a signature: trust, where `verify` alone gives integrity.

`trtconv verify` checks every file against manifest.json, but the manifest itself can be edited (a
FAILED artifact edited to say PASSED, a changed file with its hash and the digest recomputed). A
signature made with a key the editor does not hold closes that gap. It is made by OpenSSF's
`model-signing` library (the format Sigstore and Hugging Face tooling read: a Sigstore bundle
holding an in-toto statement that lists every file with its sha256), over every file of the
artifact, manifest.json included.

Choices (see /work/notes/signing/FINDINGS.md for the measurements behind them):
- The signature lives inside OUT as `model.sig` by default, so it travels with the folder (CI
  uploads OUT as one artifact). It is the one file left out of both the manifest and the signed
  file list; `--signature PATH` puts it anywhere else.
- Sign and verify always pass the same explicit hashing config (sha256 per file, git paths NOT
  ignored, symlinks refused): letting the verifier guess it from the bundle re-ignores `.git/`
  and drops the symlink setting.
- Key signing (EC P-256/384/521 PEM) and certificate signing against your own CA are fully
  offline. The library's default Sigstore signer needs the network and is never reached.
- `model_signing` is imported inside the functions: it pulls sigstore, tuf and requests (~0.7 s).
"""

from __future__ import annotations

import os
from pathlib import Path

from trtconv.artifact.layout import SIGNATURE_NAME
from trtconv.core.errors import UserError

__all__ = ["SIGNATURE_NAME", "SignatureError", "sign_artifact", "verify_signature"]
PASSWORD_ENV = "TRTCONV_SIGNING_KEY_PASSWORD"


class SignatureError(Exception):
    """The signature does not vouch for these files (tampered artifact, wrong key, edited signature)."""

    exit_code = 1


def default_signature(artifact: Path) -> Path:
    return Path(artifact) / SIGNATURE_NAME


def _hashing_config():
    from model_signing import hashing

    return (
        hashing.Config()
        .use_file_serialization(hashing_algorithm="sha256")
        .set_ignored_paths(paths=[SIGNATURE_NAME], ignore_git_paths=False)
        .set_allow_symlinks(False)
    )


def _readable(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist (or is not a file)")
    return path


def _check_private_key(path: Path) -> bytes | None:
    """The password (bytes) for an encrypted key; refuses key types model-signing cannot use."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    data = _readable(path, "--key").read_bytes()
    password = os.environ.get(PASSWORD_ENV)
    pw = password.encode() if password else None
    try:
        key = load_pem_private_key(data, password=pw)
    except TypeError:
        raise UserError(f"--key {path} is encrypted: put its password in the environment variable {PASSWORD_ENV}") from None
    except ValueError as exc:
        raise UserError(f"--key {path}: not a PEM private key, or a wrong {PASSWORD_ENV} ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise UserError(
            f"--key {path} is a {type(key).__name__.removeprefix('_')} key; model-signing signs with elliptic-curve keys "
            "(P-256, P-384, P-521) only, e.g. `openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt -out key.pem`"
        )
    return pw


def sign_artifact(artifact: Path, key: Path, signature: Path | None = None,
                  certificate: Path | None = None, chain: list[Path] | None = None) -> Path:
    """Sign every file of the artifact (manifest included) with an EC key, or a key + certificate."""
    from model_signing import signing

    artifact = Path(artifact)
    signature = Path(signature) if signature else default_signature(artifact)
    password = _check_private_key(key)
    config = signing.Config()
    try:
        if certificate is not None:
            config.use_certificate_signer(
                private_key=key, signing_certificate=_readable(certificate, "--certificate"),
                certificate_chain=[_readable(c, "--chain") for c in chain or []],
            )
        else:
            config.use_elliptic_key_signer(private_key=key, password=password)
    except ValueError as exc:  # e.g. the certificate does not belong to the key
        raise UserError(f"cannot sign with --key {key}: {exc}") from None
    tmp = signature.with_name(f".{signature.name}.tmp-{os.getpid()}")
    try:
        config.set_hashing_config(_hashing_config()).sign(artifact, tmp)
        os.replace(tmp, signature)
    except ValueError as exc:  # a symlink inside the artifact, and the like
        raise UserError(f"cannot sign {artifact}: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return signature


def verify_signature(artifact: Path, signature: Path | None = None, public_key: Path | None = None,
                     certificate_chain: list[Path] | None = None) -> None:
    """Raise SignatureError unless `signature` vouches for exactly the files in `artifact`."""
    from model_signing import verifying

    artifact = Path(artifact)
    signature = _readable(Path(signature) if signature else default_signature(artifact), "signature")
    if (public_key is None) == (not certificate_chain):
        raise UserError("give exactly one of --public-key PUB.pem (key signing) or --certificate-chain CA.pem (certificate signing)")
    config = verifying.Config()
    try:
        if public_key is not None:
            config.use_elliptic_key_verifier(public_key=_readable(public_key, "--public-key"))
        else:
            config.use_certificate_verifier(certificate_chain=[_readable(c, "--certificate-chain") for c in certificate_chain])
    except ValueError as exc:
        raise UserError(f"cannot read the verification key: {exc}") from None
    try:
        config.set_hashing_config(_hashing_config()).verify(artifact, signature)
    except Exception as exc:  # the library raises ValueError, InvalidSignature, JSON and OpenSSL errors alike
        raise SignatureError(f"signature {signature} does not verify {artifact}: {_explain(exc)}") from None


def _explain(exc: Exception) -> str:
    """model-signing's exceptions, reworded (some have empty messages or raw byte reprs)."""
    name = type(exc).__name__
    text = str(exc).strip()
    if name == "InvalidSignature":
        return "the signature itself does not check (the signature file was edited, or made with another key)"
    if name == "JSONDecodeError" or "bundle" in text.lower() and "parse" in text.lower():
        return f"the signature file is not a valid Sigstore bundle ({text})"
    if name == "X509StoreContextError":
        return f"the signing certificate does not chain to the given --certificate-chain ({text})"
    if text.startswith("Key mismatch"):
        return "it was made with another key than --public-key"
    if text.startswith("Signature mismatch"):
        return _mismatches(text)
    return f"{name}: {text}" if text else name


def _mismatches(text: str) -> str:
    import re

    found = []
    # The library joins its findings into a list repr: quotes may come escaped (\\').
    for m in re.finditer(r"Hash mismatch for \\?'([^'\\]+)\\?'", text):
        found.append(f"changed: {m.group(1)}")
    for kind, label in (("Extra files found in model", "added"), ("Missing files in model", "removed")):
        for m in re.finditer(kind + r" \\?'[^']*\\?': ([^\]\"']+)", text):
            found += [f"{label}: {name.strip()}" for name in m.group(1).split(",")]
    return "; ".join(found) or text
