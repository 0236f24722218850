"""`trtconv sign` and `trtconv verify`: integrity, a pinned digest, status, and signatures (issue 13, item 4).

One real artifact is built per module (tiny Llama, precision none: no ModelOpt), then copied for
each tamper case. Keys are made here: EC P-256 pairs, and an offline CA with a leaf signing cert.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

FAST = ["--num-samples", "4", "--seq-len", "64", "--batch-size", "4",
        "--set", "evaluate.num_samples=8", "--set", "evaluate.seq_len=64"]
LENIENT = ["--set", "evaluate.allow_inconclusive=true", "--set", "evaluate.gates.max_ppl_increase_pct=1000",
           "--set", "evaluate.gates.max_kl=100", "--set", "evaluate.gates.min_top1_agreement=0"]


def _cli(*args):
    from typer.testing import CliRunner

    from trtconv.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_llama) -> Path:
    out = tmp_path_factory.mktemp("signing") / "passed"
    r = _cli("calibrate", "--model", tiny_llama, "--precision", "none", "-o", out, *FAST, *LENIENT)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def failed(tmp_path_factory, tiny_llama) -> Path:
    out = tmp_path_factory.mktemp("signing") / "failed"
    r = _cli("calibrate", "--model", tiny_llama, "--precision", "fp8", "-o", out, *FAST, "--set", "evaluate.gates.max_kl=0")
    assert r.exit_code == 1, r.output
    assert json.loads((out / "manifest.json").read_text())["status"] == "failed"
    return out


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d = tmp_path_factory.mktemp("keys")
    made: dict[str, Path] = {}

    def write(name, key):
        made[f"{name}.key"] = d / f"{name}.key"
        made[f"{name}.pub"] = d / f"{name}.pub"
        made[f"{name}.key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
        made[f"{name}.pub"].write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
        return key

    signer, other, ca = (write(n, ec.generate_private_key(ec.SECP256R1())) for n in ("signer", "other", "ca"))
    write("rsa", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject, issuer, pub, key, is_ca):
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
             .public_key(pub).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=30))
             .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
             .add_extension(x509.KeyUsage(digital_signature=not is_ca, content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False, key_cert_sign=is_ca, crl_sign=is_ca,
                                          encipher_only=False, decipher_only=False), critical=True))
        if not is_ca:
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
        return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    made["ca.crt"] = d / "ca.crt"
    made["ca.crt"].write_bytes(cert("trtconv test ca", "trtconv test ca", ca.public_key(), ca, True))
    made["other-ca.crt"] = d / "other-ca.crt"
    made["other-ca.crt"].write_bytes(cert("other ca", "other ca", other.public_key(), other, True))
    made["signer.crt"] = d / "signer.crt"
    made["signer.crt"].write_bytes(cert("trtconv release", "trtconv test ca", signer.public_key(), ca, False))
    return made


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "art"
    shutil.copytree(src, dst)
    return dst


def _digest(out: Path) -> str:
    return json.loads((out / "manifest.json").read_text())["artifact_digest"]


def _signed(built, tmp_path, keys) -> Path:
    art = _copy(built, tmp_path)
    r = _cli("sign", art, "--key", keys["signer.key"])
    assert r.exit_code == 0, r.output
    assert (art / "model.sig").is_file()
    return art


def _verify(art, keys, *extra):
    return _cli("verify", art, "--public-key", keys["signer.pub"], "--expect-digest", _PINNED[0], *extra)


_PINNED: list[str] = []


@pytest.fixture(autouse=True)
def _pin(built):
    _PINNED[:] = [_digest(built)]


def test_sign_then_verify_with_key_and_pinned_digest(built, tmp_path, keys):
    art = _signed(built, tmp_path, keys)
    r = _verify(art, keys)
    assert r.exit_code == 0, r.output
    # The full digest on one line, whatever the width: grep finds it.
    assert f"artifact_digest: {_digest(built)}" in r.output.splitlines()
    assert "signature valid" in r.output and "digest as expected" in r.output
    bundle = json.loads((art / "model.sig").read_text())
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    names = {res["name"] for res in statement["predicate"]["resources"]}
    assert "manifest.json" in names and "model.sig" not in names
    assert names == {f["path"] for f in json.loads((art / "manifest.json").read_text())["outputs"]} | {"manifest.json"}


def test_changed_file(built, tmp_path, keys):
    art = _signed(built, tmp_path, keys)
    (art / "recipe.yaml").write_text((art / "recipe.yaml").read_text() + "# edited\n")
    r = _verify(art, keys)
    assert r.exit_code == 1
    assert "changed: recipe.yaml" in r.output


def test_added_file(built, tmp_path, keys):
    art = _signed(built, tmp_path, keys)
    (art / "checkpoint" / "extra.bin").write_bytes(b"x")
    r = _verify(art, keys)
    assert r.exit_code == 1
    assert "extra: checkpoint/extra.bin" in r.output and "added: checkpoint/extra.bin" in r.output


def test_removed_file(built, tmp_path, keys):
    art = _signed(built, tmp_path, keys)
    (art / "recipe.yaml").unlink()
    r = _verify(art, keys)
    assert r.exit_code == 1
    assert "missing: recipe.yaml" in r.output and "removed: recipe.yaml" in r.output


def test_failed_artifact_edited_to_say_passed(failed, tmp_path, keys):
    art = _copy(failed, tmp_path)
    assert _cli("verify", art).exit_code == 4  # intact, but its gate failed
    assert _cli("verify", art, "--allow-failed").exit_code == 0
    assert _cli("sign", art, "--key", keys["signer.key"]).exit_code == 2  # refused: not passed
    assert _cli("sign", art, "--key", keys["signer.key"], "--allow-failed").exit_code == 0
    m = json.loads((art / "manifest.json").read_text())
    m["status"], m["status_reason"] = "passed", ""
    (art / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
    # The manifest is not among its own files, but it contradicts its own gate verdicts (issue 23.6).
    plain = _cli("verify", art)
    assert plain.exit_code == 1 and "status is passed, but its gates say" in plain.output
    r = _cli("verify", art, "--public-key", keys["signer.pub"])
    assert r.exit_code == 1
    assert "changed: manifest.json" in r.output


def test_changed_file_with_hash_and_digest_recomputed(built, tmp_path, keys):
    from trtconv.artifact.manifest import artifact_digest, hash_tree, read_manifest, write_manifest

    art = _signed(built, tmp_path, keys)
    (art / "tokenizer" / "tokenizer_config.json").write_text("{}")
    m = read_manifest(art)
    m.outputs = hash_tree(art)
    m.artifact_digest = artifact_digest(m.outputs)
    write_manifest(m, art)
    assert _cli("verify", art).exit_code == 0  # what the issue found: consistent, so it verified
    pinned = _cli("verify", art, "--expect-digest", _digest(built))
    assert pinned.exit_code == 1 and f"is not the expected {_digest(built)}" in pinned.output
    signed = _cli("verify", art, "--public-key", keys["signer.pub"])
    assert signed.exit_code == 1
    assert "changed: manifest.json" in signed.output and "changed: tokenizer/tokenizer_config.json" in signed.output


def test_signature_edited(built, tmp_path, keys):
    art = _signed(built, tmp_path, keys)
    bundle = json.loads((art / "model.sig").read_text())
    sig = bundle["dsseEnvelope"]["signatures"][0]["sig"]
    bundle["dsseEnvelope"]["signatures"][0]["sig"] = sig[:10] + ("A" if sig[10] != "A" else "B") + sig[11:]
    (art / "model.sig").write_text(json.dumps(bundle))
    r = _verify(art, keys)
    assert r.exit_code == 1
    assert "the signature itself does not check" in r.output


def test_signature_payload_edited_to_match_tampered_files(built, tmp_path, keys):
    art = _signed(built, tmp_path, keys)
    (art / "recipe.yaml").write_text("name: evil\n")
    bundle = json.loads((art / "model.sig").read_text())
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    for res in statement["predicate"]["resources"]:
        if res["name"] == "recipe.yaml":
            res["digest"] = hashlib.sha256(b"name: evil\n").hexdigest()
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    (art / "model.sig").write_text(json.dumps(bundle))
    r = _cli("verify", art, "--public-key", keys["signer.pub"], "--allow-failed")
    assert r.exit_code == 1
    assert "does not verify" in r.output


def test_wrong_key(built, tmp_path, keys):
    art = _signed(built, tmp_path, keys)
    r = _cli("verify", art, "--public-key", keys["other.pub"])
    assert r.exit_code == 1
    assert "made with another key than --public-key" in r.output


def test_missing_signature_and_unsupported_key_are_user_errors(built, tmp_path, keys):
    art = _copy(built, tmp_path)
    r = _cli("verify", art, "--public-key", keys["signer.pub"])
    assert r.exit_code == 2 and "model.sig does not exist" in r.output
    r = _cli("sign", art, "--key", keys["rsa.key"])
    assert r.exit_code == 2 and "elliptic-curve keys" in r.output
    assert _cli("verify", art, "--expect-digest", "abc").exit_code == 2


def test_certificate_signing_offline(built, tmp_path, keys):
    art = _copy(built, tmp_path)
    sig = tmp_path / "art.sig"  # beside the folder this time
    r = _cli("sign", art, "--key", keys["signer.key"], "--certificate", keys["signer.crt"], "--chain", keys["ca.crt"],
             "--signature", sig)
    assert r.exit_code == 0, r.output
    assert not (art / "model.sig").exists()
    assert _cli("verify", art, "--signature", sig, "--certificate-chain", keys["ca.crt"]).exit_code == 0
    bad = _cli("verify", art, "--signature", sig, "--certificate-chain", keys["other-ca.crt"])
    assert bad.exit_code == 1 and "does not chain" in bad.output


def test_engine_without_a_build_leaves_the_manifest_alone(built, tmp_path, keys):
    art = _signed(built, tmp_path, keys)
    before = (art / "manifest.json").read_bytes()
    r = _cli("engine", art, "--target", "tensorrt")
    assert r.exit_code == 0, r.output
    assert "unchanged (nothing was built)" in r.output
    assert (art / "manifest.json").read_bytes() == before
    assert _verify(art, keys).exit_code == 0


# ---------------------------------------------------------------------------------------------
# Issue 23.6: the manifest checked against itself (trtconv.artifact.consistency)


def _edit_manifest(art: Path, edit) -> None:
    m = json.loads((art / "manifest.json").read_text())
    edit(m)
    (art / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")


def _failing_gate(m: dict) -> dict:
    return next(g for g in m["gates"] if g["verdict"] == "fail")


def test_untouched_artifacts_are_consistent(built, failed):
    from trtconv.artifact.consistency import manifest_problems
    from trtconv.artifact.manifest import read_manifest

    for art in (built, failed):  # built: allow_inconclusive with lenient gates; failed: max_kl = 0
        assert manifest_problems(art, read_manifest(art)) == []


def test_status_edited_to_passed_fails_verify_under_the_failed_builds_digest_and_sign_refuses(failed, tmp_path, keys):
    art = _copy(failed, tmp_path)
    digest = _digest(failed)
    _edit_manifest(art, lambda m: m.update(status="passed", status_reason=""))
    r = _cli("verify", art, "--expect-digest", digest, "--allow-failed")
    assert r.exit_code == 1, r.output
    assert "manifest: status is passed, but its gates say max_kl" in r.output and "fail" in r.output
    s = _cli("sign", art, "--key", keys["signer.key"])
    assert s.exit_code == 2 and "refusing to sign it" in s.output and "status is passed, but" in s.output
    assert not (art / "model.sig").exists()


def test_gate_verdicts_edited_with_the_status_contradict_their_metrics(failed, tmp_path):
    art = _copy(failed, tmp_path)

    def edit(m):
        m.update(status="passed", status_reason="")
        for g in m["gates"]:
            g["verdict"] = "pass"

    gate = _failing_gate(json.loads((failed / "manifest.json").read_text()))["metric"]
    _edit_manifest(art, edit)
    r = _cli("verify", art, "--expect-digest", _digest(failed))
    assert r.exit_code == 1
    assert f"gate {gate} says pass, but its metrics and threshold give fail" in r.output


def test_an_edited_metric_fails_verify(built, tmp_path):
    art = _copy(built, tmp_path)

    def edit(m):
        part = next(iter(m["metrics"]["packs"].values()))
        part["mean_kl"]["value"] *= 0.5

    _edit_manifest(art, edit)
    r = _cli("verify", art)
    assert r.exit_code == 1
    assert "manifest: gate max_kl[" in r.output and "is not the metrics'" in r.output


def test_an_edited_threshold_or_a_dropped_gate_fails_verify(failed, tmp_path):
    art = _copy(failed, tmp_path)
    gate = _failing_gate(json.loads((failed / "manifest.json").read_text()))
    _edit_manifest(art, lambda m: m["recipe"]["evaluate"]["gates"].update(max_kl=1.0))
    r = _cli("verify", art, "--allow-failed")
    assert r.exit_code == 1
    assert "recipe_sha256 is not the sha256 of its recipe" in r.output and "not the one in recipe.yaml" in r.output
    assert f"gate {gate['metric']} threshold 0 is not the recipe's evaluate.gates.max_kl = 1" in r.output

    art2 = _copy(failed, tmp_path / "dropped")
    _edit_manifest(art2, lambda m: m.update(status="passed", gates=[g for g in m["gates"] if g["verdict"] == "pass"]))
    r = _cli("verify", art2)
    assert r.exit_code == 1 and f"gate {gate['metric']} is missing" in r.output


def test_report_rewritten_under_a_pinned_digest_is_caught_by_the_signature(built, tmp_path, keys):
    """report.md is a run record, outside the digest (README: what the digest covers): a rewrite whose
    manifest entry is updated to match passes a pinned digest, and fails the signature."""
    from trtconv.artifact.manifest import hash_tree, read_manifest, write_manifest

    art = _signed(built, tmp_path, keys)
    (art / "report.md").write_text("# all gates passed, ship it\n")
    m = read_manifest(art)
    m.outputs = hash_tree(art)
    write_manifest(m, art)
    assert _cli("verify", art, "--expect-digest", _digest(built)).exit_code == 0
    r = _verify(art, keys)
    assert r.exit_code == 1 and "changed: report.md" in r.output


def test_a_nan_metric_is_consistent_with_itself(failed, tmp_path):
    """A diverged candidate records NaN; NaN != NaN must not read as an edit."""
    from trtconv.artifact.consistency import manifest_problems
    from trtconv.artifact.manifest import Manifest, read_manifest

    m = read_manifest(failed).model_dump(mode="json")
    part = next(iter(m["metrics"]["packs"].values()))
    part["mean_kl"] = {"value": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    name = next(iter(m["metrics"]["packs"]))
    for g in m["gates"]:
        if g["metric"] == f"max_kl[{name}]":
            g.update(value=float("nan"), ci_low=float("nan"), ci_high=float("nan"), verdict="inconclusive")
    m["status"] = "failed"
    assert manifest_problems(failed, Manifest.model_validate(json.loads(json.dumps(m)))) == []
