"""The cluster key and what is derived from it, and each node's own key pair.

Model: every member of a cluster holds one secret, the cluster key (32
random bytes). From it each node derives, deterministically and alone, the
same cluster CA key pair (HKDF-SHA256, then a P-256 scalar), so any member
can issue certificates that every other member accepts, and a machine
without the key can issue none. Each node also has its own P-256 key pair,
kept in its data dir; its node id is a hash of its public key, so a member
that holds the cluster key still cannot pose as another member: the records
it signs and the TLS certificate it presents must carry a key whose hash is
the id it claims.

Only standard constructions from `cryptography` are used: HKDF, ECDSA P-256
with SHA-256, X.509 certificates."""

import base64
import datetime
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

KEY_PREFIX = "exod1-"
KEY_BYTES = 32
# Every node certificate names this DNS SAN, and every client asks for it:
# peers are found by address, so the name proves only membership. Which
# member answered is proven by the key hash (node id), never by a name.
PEER_NAME = "peer.exod.invalid"
_CURVE = ec.SECP256R1()
_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_EPOCH = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
_NODE_CERT_DAYS = 3650


class ClusterKeyError(ValueError):
    """A cluster key that is not one, or a key file that cannot be read."""


def new_cluster_key() -> str:
    return KEY_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(KEY_BYTES)).decode().rstrip("=")


def parse_cluster_key(text: str) -> bytes:
    text = (text or "").strip()
    if not text.startswith(KEY_PREFIX):
        raise ClusterKeyError(f"a cluster key starts with {KEY_PREFIX!r} (make one with `exod key new`)")
    body = text[len(KEY_PREFIX):]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except ValueError:
        raise ClusterKeyError("the cluster key is not base64url") from None
    if len(raw) != KEY_BYTES:
        raise ClusterKeyError(f"a cluster key holds {KEY_BYTES} bytes, this one {len(raw)}")
    return raw


def _hkdf(secret: bytes, info: bytes, length: int = 48) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=b"exod cluster key v1", info=info).derive(secret)


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    return hashlib.sha256(spki(public_key)).hexdigest()[:32]


def spki(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def node_id_of(public_key_der: bytes) -> str:
    """A node's id: the first 128 bits of SHA-256 over its public key (DER)."""
    return hashlib.sha256(public_key_der).hexdigest()[:32]


@dataclass(frozen=True)
class ClusterCA:
    private_key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    # Public: a hash of the CA's public key. mDNS carries it so that a node of
    # another cluster key is known as one without a connection.
    fingerprint: str

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)


def derive_ca(cluster_key: bytes) -> ClusterCA:
    # 48 bytes reduced modulo the group order: the bias is below 2^-128.
    scalar = int.from_bytes(_hkdf(cluster_key, b"ca private key"), "big") % (_ORDER - 1) + 1
    private_key = ec.derive_private_key(scalar, _CURVE)
    public_key = private_key.public_key()
    fingerprint = key_id(public_key)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"exod cluster {fingerprint[:16]}")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(public_key)
        # The same serial and dates on every node: they all derive one CA.
        .serial_number(int(fingerprint, 16) >> 1 or 1)
        .not_valid_before(_EPOCH).not_valid_after(_EPOCH + datetime.timedelta(days=365 * 100))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(private_key, hashes.SHA256())
    )
    return ClusterCA(private_key, certificate, fingerprint)


@dataclass(frozen=True)
class NodeIdentity:
    """A node's key pair and the certificate the cluster CA issued for it."""
    private_key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    ca: ClusterCA

    @property
    def node_id(self) -> str:
        return node_id_of(self.public_key_der)

    @property
    def public_key_der(self) -> bytes:
        return spki(self.private_key.public_key())

    @property
    def key_pem(self) -> bytes:
        return self.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption())

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message, ec.ECDSA(hashes.SHA256()))


def issue(ca: ClusterCA, private_key: ec.EllipticCurvePrivateKey) -> NodeIdentity:
    public_key = private_key.public_key()
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id_of(spki(public_key)))]))
        .issuer_name(ca.certificate.subject).public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=_NODE_CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(PEER_NAME)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.private_key.public_key()),
                       critical=False)
        .sign(ca.private_key, hashes.SHA256())
    )
    return NodeIdentity(private_key, certificate, ca)


def verify(public_key_der: bytes, signature: bytes, message: bytes) -> bool:
    """True when `signature` is the holder of `public_key_der` signing `message`."""
    try:
        public_key = serialization.load_der_public_key(public_key_der)
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name != _CURVE.name:
            return False
        public_key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


def node_id_from_cert_pem(pem: bytes) -> str:
    """The node id a TLS peer proved: the hash of its certificate's key."""
    return node_id_of(spki(x509.load_pem_x509_certificate(pem).public_key()))


# ------------------------------------------------------------------ files


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(path)


def load_or_create_node_key(data_dir: Path) -> ec.EllipticCurvePrivateKey:
    path = data_dir / "node_key.pem"
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == _CURVE.name:
            return key
    except (OSError, ValueError, TypeError):
        pass
    return new_node_key(data_dir)


def new_node_key(data_dir: Path) -> ec.EllipticCurvePrivateKey:
    key = ec.generate_private_key(_CURVE)
    _write_private(data_dir / "node_key.pem", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return key


def read_key_file(path: Path) -> bytes:
    try:
        return parse_cluster_key(Path(path).expanduser().read_text())
    except OSError as e:
        raise ClusterKeyError(f"cannot read the cluster key file {path}: {e.strerror or e}") from None


def generated_key_path(data_dir: Path) -> Path:
    return data_dir / "cluster_key"


def load_generated(data_dir: Path) -> bytes | None:
    """The key an earlier first start made in the data dir, if any."""
    path = generated_key_path(data_dir)
    return read_key_file(path) if path.is_file() else None


def save_generated(data_dir: Path, text: str) -> Path:
    path = generated_key_path(data_dir)
    _write_private(path, (text + "\n").encode())
    return path
