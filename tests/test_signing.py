"""biofed.signing and signed envelopes in biofed.protocol: forgery, tampering, replay,
re-targeting, unknown/revoked senders, downgrade, key files."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from biofed.protocol import (
    SIGNATURE_CONTEXT,
    BadSignature,
    InvalidPayload,
    MalformedMessage,
    MessageTooLarge,
    ProtocolError,
    ReplayedMessage,
    SenderMismatch,
    StaleMessage,
    Status,
    Task,
    Topics,
    UnknownSender,
    UnsignedMessage,
    Update,
    UpdateMetrics,
    WrongFleet,
    decode_message,
    decode_topic_message,
    encode_message,
    offline_status,
)
from biofed.signing import KeyRing, Signer, Verifier, load_signer

FLEET = "ward7"
TOPICS = Topics(FLEET)
NOW = 1.8e9
METRICS = UpdateMetrics(loss=0.5, n_windows=10, rss_bytes=1, cpu_time_s=0.1)


@pytest.fixture(scope="module")
def signers():
    return {name: Signer.generate(name) for name in ("pi-01", "pi-02", "coordinator")}


@pytest.fixture
def ring(signers):
    return KeyRing({name: s.public_key for name, s in signers.items()})


def _verifier(ring, now=NOW, **kwargs):
    return Verifier(ring, clock=lambda: now, **kwargs)


def _update(round_=3, delta=None):
    delta = np.linspace(-0.1, 0.1, 66) if delta is None else delta
    return Update(round=round_, basis_version=1, delta=delta, n_examples=50, clipped=False, metrics=METRICS)


def _signed_update(signers, sender="pi-01", round_=3, created=NOW, fleet=FLEET, message_id=None):
    return encode_message(
        _update(round_), fleet=fleet, sender=sender, created=created, message_id=message_id, signer=signers[sender]
    )


def _frame(data):
    return msgpack.unpackb(data, raw=False)


def _reframe(frame):
    return msgpack.packb(frame, use_bin_type=True)


def test_signed_round_trip_verified(signers, ring):
    data = _signed_update(signers)
    message = decode_topic_message(TOPICS, TOPICS.update("pi-01"), data, verifier=_verifier(ring))
    assert message.verified and message.sender == "pi-01" and message.round == 3
    np.testing.assert_array_equal(message.payload.delta, np.linspace(-0.1, 0.1, 66))


def test_unsigned_encoding_is_unchanged_by_the_extension(signers):
    """Without a signer the bytes are the old envelope; the signed frame wraps exactly those bytes."""
    mid = bytes(range(16))
    plain = encode_message(_update(), fleet=FLEET, sender="pi-01", created=NOW, message_id=mid)
    signed = encode_message(
        _update(), fleet=FLEET, sender="pi-01", created=NOW, message_id=mid, signer=signers["pi-01"]
    )
    frame = _frame(signed)
    assert set(frame) == {"s", "e", "sig"} and frame["e"] == plain and frame["s"] == "pi-01"
    signers["pi-01"].public_key.verify(frame["sig"], SIGNATURE_CONTEXT + plain)


def test_receiver_without_verifier_accepts_signed_and_unsigned(signers):
    signed = decode_message(_signed_update(signers))
    plain = decode_message(encode_message(_update(), fleet=FLEET, sender="pi-01"))
    assert not signed.verified and not plain.verified
    assert signed.payload.n_examples == plain.payload.n_examples == 50


def test_forged_signature_wrong_key_rejected(ring):
    impostor = Signer.generate("pi-01")  # right id, wrong private key
    data = encode_message(_update(), fleet=FLEET, sender="pi-01", created=NOW, signer=impostor)
    with pytest.raises(BadSignature, match="does not verify"):
        decode_topic_message(TOPICS, TOPICS.update("pi-01"), data, verifier=_verifier(ring))


def test_device_signing_as_another_device_rejected(signers, ring):
    """pi-02's key over an envelope naming pi-01, framed as pi-02: the inner sender differs."""
    frame = _frame(_signed_update(signers, sender="pi-01"))
    frame["s"] = "pi-02"
    frame["sig"] = signers["pi-02"].sign(SIGNATURE_CONTEXT + frame["e"])
    with pytest.raises(SenderMismatch, match="signed by 'pi-02' claims sender 'pi-01'"):
        decode_message(_reframe(frame), verifier=_verifier(ring))
    # and the outer sender swapped without re-signing fails the signature
    frame = _frame(_signed_update(signers, sender="pi-01"))
    frame["s"] = "pi-02"
    with pytest.raises(BadSignature):
        decode_message(_reframe(frame), verifier=_verifier(ring))


def test_signer_of_another_sender_refused_on_encode(signers):
    with pytest.raises(InvalidPayload, match="cannot sign messages of sender 'pi-01'"):
        encode_message(_update(), fleet=FLEET, sender="pi-01", signer=signers["pi-02"])


@pytest.mark.parametrize("where", ["payload", "round", "first", "last"])
def test_one_flipped_bit_rejected(signers, ring, where):
    frame = _frame(_signed_update(signers))
    envelope = bytearray(frame["e"])
    if where == "payload":  # a bit inside the delta array's raw bytes
        index = envelope.index(np.float64(0.1).tobytes())
    elif where == "round":
        index = envelope.index(b"\xa1r") + 2  # the fixint after the "r" key
    else:
        index = 0 if where == "first" else len(envelope) - 1
    envelope[index] ^= 0x01
    frame["e"] = bytes(envelope)
    with pytest.raises(BadSignature, match="does not verify"):
        decode_message(_reframe(frame), verifier=_verifier(ring))


def test_flipped_signature_bit_rejected(signers, ring):
    frame = _frame(_signed_update(signers))
    sig = bytearray(frame["sig"])
    sig[17] ^= 0x80
    frame["sig"] = bytes(sig)
    with pytest.raises(BadSignature):
        decode_message(_reframe(frame), verifier=_verifier(ring))


def test_same_bytes_replayed_rejected_as_duplicate(signers, ring):
    verifier = _verifier(ring)
    data = _signed_update(signers)
    decode_message(data, verifier=verifier)
    with pytest.raises(ReplayedMessage, match="already accepted"):
        decode_message(data, verifier=verifier)


def _retarget(data, key, value):
    """Rewrite one envelope field inside a signed frame, keeping the original signature."""
    frame = _frame(data)
    envelope = msgpack.unpackb(frame["e"], raw=False)
    envelope[key] = value
    frame["e"] = msgpack.packb(envelope, use_bin_type=True)
    return _reframe(frame)


@pytest.mark.parametrize(
    ("key", "value"), [("r", 4), ("f", "ward8"), ("k", "sketch"), ("t", NOW + 1.0), ("id", bytes(16))]
)
def test_retargeted_message_fails_signature(signers, ring, key, value):
    data = _retarget(_signed_update(signers), key, value)
    with pytest.raises(BadSignature, match="does not verify"):
        decode_message(data, verifier=_verifier(ring))


def test_retargeted_to_other_topic_rejected(signers, ring):
    """A device's update republished on another device's topic: the signed sender differs."""
    data = _signed_update(signers, sender="pi-01")
    with pytest.raises(SenderMismatch, match="claims sender 'pi-01'"):
        decode_topic_message(TOPICS, TOPICS.update("pi-02"), data, verifier=_verifier(ring))
    with pytest.raises(WrongFleet):
        decode_topic_message(Topics("ward8"), Topics("ward8").update("pi-01"), data, verifier=_verifier(ring))


def test_unknown_sender_rejected(signers):
    ring = KeyRing({"pi-02": signers["pi-02"].public_key})
    with pytest.raises(UnknownSender, match="'pi-01' has no public key"):
        decode_message(_signed_update(signers, sender="pi-01"), verifier=_verifier(ring))


def test_revoked_sender_rejected(signers, ring):
    verifier = _verifier(ring)
    decode_message(_signed_update(signers, sender="pi-01"), verifier=verifier)
    ring.revoke("pi-01")
    assert "pi-01" not in ring and "pi-02" in ring
    with pytest.raises(UnknownSender, match="'pi-01' is revoked"):
        decode_message(_signed_update(signers, sender="pi-01"), verifier=verifier)


def test_unsigned_when_required_rejected(ring):
    data = encode_message(_update(), fleet=FLEET, sender="pi-01", created=NOW)
    with pytest.raises(UnsignedMessage, match="not signed"):
        decode_message(data, verifier=_verifier(ring))
    with pytest.raises(UnsignedMessage):  # KeyRing alone also refuses a downgrade
        decode_message(data, verifier=ring)
    # an unsigned envelope dressed as a frame with an empty signature
    frame = {"s": "pi-01", "e": data, "sig": b""}
    with pytest.raises(BadSignature, match="0 bytes"):
        decode_message(_reframe(frame), verifier=ring)
    assert issubclass(UnsignedMessage, BadSignature) and issubclass(BadSignature, ProtocolError)


def test_malformed_frame_rejected(ring):
    frame = {"s": "pi-01", "e": "not bytes", "sig": bytes(64)}
    with pytest.raises(MalformedMessage, match="wrong types"):
        decode_message(_reframe(frame), verifier=ring)
    frame = {"s": "pi/01", "e": b"x", "sig": bytes(64)}
    with pytest.raises(MalformedMessage, match="invalid sender"):
        decode_message(_reframe(frame), verifier=ring)


def test_size_limit_checked_before_signature(signers, ring):
    data = _signed_update(signers)
    with pytest.raises(MessageTooLarge):
        decode_message(data, verifier=ring, max_bytes=len(data) - 1)
    with pytest.raises(MessageTooLarge, match="above the"):
        encode_message(
            _update(),
            fleet=FLEET,
            sender="pi-01",
            signer=signers["pi-01"],
            max_bytes=len(encode_message(_update(), fleet=FLEET, sender="pi-01")) + 10,
        )


def test_clock_skew(signers, ring):
    verifier = _verifier(ring, max_skew_s=60.0)
    decode_message(_signed_update(signers, created=NOW - 59), verifier=verifier)
    with pytest.raises(StaleMessage, match="created 61 s ago"):
        decode_message(_signed_update(signers, created=NOW - 61), verifier=verifier)
    with pytest.raises(StaleMessage, match="in the future"):
        decode_message(_signed_update(signers, created=NOW + 61), verifier=verifier)


def test_retained_kinds_exempt_from_age_but_not_from_future(signers, ring):
    verifier = _verifier(ring, max_skew_s=60.0)
    task = Task(round=2, model=np.zeros(66), basis_version=1, classes=("a", "b"), deadline=NOW + 30)
    old = encode_message(task, fleet=FLEET, sender="coordinator", created=NOW - 3600, signer=signers["coordinator"])
    assert decode_topic_message(TOPICS, TOPICS.task, old, verifier=verifier).verified
    future = encode_message(task, fleet=FLEET, sender="coordinator", created=NOW + 3600, signer=signers["coordinator"])
    with pytest.raises(StaleMessage, match="future"):
        decode_topic_message(TOPICS, TOPICS.task, future, verifier=verifier)


def test_signed_last_will(signers, ring):
    will = offline_status(fleet=FLEET, device_id="pi-02", signer=signers["pi-02"])
    message = decode_topic_message(TOPICS, TOPICS.status("pi-02"), will, verifier=_verifier(ring, now=0.0 + 1e10))
    assert isinstance(message.payload, Status) and message.payload.state == "offline" and message.verified


def test_verifier_arguments_checked(ring):
    with pytest.raises(ValueError, match="max_skew_s must be"):
        Verifier(ring, max_skew_s=0)
    with pytest.raises(TypeError, match="keyring must be a KeyRing"):
        Verifier({"pi-01": None})
    with pytest.raises(ValueError, match="invalid key id"):
        ring.revoke("bad id")
    with pytest.raises(TypeError, match="Ed25519PublicKey"):
        KeyRing({"pi-01": X25519PrivateKey.generate().public_key()})


# ----------------------------------------------------------------------------- key files
def _write_private(path, key):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def test_key_directory_round_trip(tmp_path):
    """The provisioning layout: DIR/keys/{id}.pub.pem, DIR/devices/{id}/signing.key.pem."""
    keys = tmp_path / "keys"
    keys.mkdir()
    for name in ("pi-01", "pi-02", "coordinator"):
        key = Ed25519PrivateKey.generate()
        where = tmp_path / ("coordinator" if name == "coordinator" else f"devices/{name}") / "signing.key.pem"
        _write_private(where, key)
        (keys / f"{name}.pub.pem").write_bytes(Signer(key, name).public_pem())
    (keys / "revoked.txt").write_text("# lost on ward 3\npi-02  # stolen\n\n")
    ring = KeyRing.from_dir(keys)
    assert ring.ids == {"pi-01", "coordinator"}
    signer = load_signer(tmp_path / "devices/pi-01/signing.key.pem", "pi-01")
    data = encode_message(_update(), fleet=FLEET, sender="pi-01", signer=signer)
    assert decode_message(data, verifier=Verifier(ring)).verified
    signer2 = load_signer(tmp_path / "devices/pi-02/signing.key.pem", "pi-02")
    with pytest.raises(UnknownSender, match="revoked"):
        decode_message(encode_message(_update(), fleet=FLEET, sender="pi-02", signer=signer2), verifier=ring)


def test_key_file_errors(tmp_path):
    with pytest.raises(ValueError, match="key directory not found"):
        KeyRing.from_dir(tmp_path / "nope")
    with pytest.raises(ValueError, match="no \\*.pub.pem public keys"):
        KeyRing.from_dir(tmp_path)
    (tmp_path / "bad name.pub.pem").write_bytes(Signer.generate("x").public_pem())
    with pytest.raises(ValueError, match="file name must be <id>.pub.pem"):
        KeyRing.from_dir(tmp_path)
    (tmp_path / "bad name.pub.pem").unlink()
    x_pub = (
        X25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    (tmp_path / "pi-01.pub.pem").write_bytes(x_pub)
    with pytest.raises(ValueError, match="Ed25519 keys only"):
        KeyRing.from_dir(tmp_path)
    (tmp_path / "pi-01.pub.pem").write_text("garbage")
    with pytest.raises(ValueError, match="not a PEM public key"):
        KeyRing.from_dir(tmp_path)
    (tmp_path / "pi-01.pub.pem").write_bytes(Signer.generate("pi-01").public_pem())
    (tmp_path / "revoked.txt").write_text("ok-id\nnot ok\n")
    with pytest.raises(ValueError, match="revoked.txt:2"):
        KeyRing.from_dir(tmp_path)
    with pytest.raises(ValueError, match="signing key file not found"):
        load_signer(tmp_path / "missing.pem", "pi-01")
    (tmp_path / "x.pem").write_text("garbage")
    with pytest.raises(ValueError, match="not an unencrypted PEM private key"):
        load_signer(tmp_path / "x.pem", "pi-01")
    _write_private(tmp_path / "x25519.pem", X25519PrivateKey.generate())
    with pytest.raises(ValueError, match="biofed signs with Ed25519"):
        load_signer(tmp_path / "x25519.pem", "pi-01")
    with pytest.raises(ValueError, match="invalid key id"):
        Signer.generate("a/b")


def test_signing_from_config(tmp_path):
    from biofed.config import ConfigError, DeviceConfig, load_config
    from biofed.signing import signing_from_config

    keys = tmp_path / "keys"
    keys.mkdir()
    device_key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    _write_private(tmp_path / "devices/pi-01/signing.key.pem", device_key)
    (keys / "pi-01.pub.pem").write_bytes(Signer(device_key, "pi-01").public_pem())
    (keys / "coordinator.pub.pem").write_bytes(Signer(other, "coordinator").public_pem())
    base = 'device_id = "pi-01"\nfleet = "ward7"\nstore_path = "s.sqlite"\n'
    path = tmp_path / "device.toml"
    path.write_text(base)
    assert signing_from_config(load_config(path, DeviceConfig), "pi-01") == (None, None)
    path.write_text(
        base + 'signing_key_file = "devices/pi-01/signing.key.pem"\nkeys_dir = "keys"\nmax_clock_skew_s = 30\n'
    )
    config = load_config(path, DeviceConfig)
    signer, verifier = signing_from_config(config, "pi-01")
    assert signer.key_id == "pi-01" and verifier.max_skew_s == 30 and verifier.keyring.ids == {"pi-01", "coordinator"}
    assert decode_message(
        encode_message(_update(), fleet=FLEET, sender="pi-01", signer=signer), verifier=verifier
    ).verified
    (keys / "pi-01.pub.pem").write_bytes(Signer(other, "pi-01").public_pem())
    with pytest.raises(ValueError, match="does not match"):
        signing_from_config(config, "pi-01")
    path.write_text(base + 'keys_dir = "keys"\n')
    with pytest.raises(ConfigError, match="keys_dir is set but signing_key_file is not"):
        load_config(path, DeviceConfig)
