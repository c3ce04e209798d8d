"""Secure aggregation by pairwise additive masking (Bonawitz et al. 2017; Flower's SecAgg+).

Every round, each sampled client makes a fresh X25519 key pair and the server relays the
public keys. Clients i and j derive the same 32-byte seed from their X25519 exchange (HKDF-
SHA256, the round and attempt in its context), expand it with ChaCha20 into a mask as long as
the model, and the one with the smaller id adds the mask while the other subtracts it. Each
client sends `quantize(w_i·u_i) + Σ masks (mod 2^32)`: its weighted update as fixed-point
integers, masked. Summed over every client of the round, each mask appears once with + and
once with −, so the sum is exactly Σ quantize(w_i·u_i) mod 2^32; the server never sees an
unmasked update. Fixed point: FRACTION_BITS fractional bits, values clipped to ±VALUE_BOUND,
so a sum of weighted updates (weights summing to 1) never wraps.

Dropouts: a client that fails after the keys were relayed leaves its peers' masks in the sum.
Kiln does not recover masks from secret shares; it redoes the round's aggregation with the
clients that answered (fresh keys, the same local updates), so no sum with a missing client is
ever unmasked. This trusts the server to report dropouts honestly (see docs/federated.md).
"""

from __future__ import annotations

import logging

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

logger = logging.getLogger(__name__)

FRACTION_BITS = 20
"""Resolution 2^-20 ≈ 1e-6 per coordinate and client."""
SCALE = float(2**FRACTION_BITS)
VALUE_BOUND = 1024.0
"""|w_i·u_i| per coordinate is clipped here; the sum stays below 2^(31-FRACTION_BITS) = 2048."""


def quantize(values: np.ndarray) -> np.ndarray:
    """Floats -> fixed point as uint32 (two's complement mod 2^32)."""
    clipped = np.clip(values.astype(np.float64), -VALUE_BOUND, VALUE_BOUND)
    return np.round(clipped * SCALE).astype(np.int64).astype(np.uint32)


def dequantize(total: np.ndarray) -> np.ndarray:
    """A uint32 sum of quantized values back to floats."""
    return (total.astype(np.uint32).view(np.int32).astype(np.float64) / SCALE).astype(np.float32)


def new_private_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def public_bytes(private: X25519PrivateKey) -> bytes:
    """The 32 raw bytes of the public key the server relays."""
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def pair_seed(private: X25519PrivateKey, peer_public: bytes, context: bytes) -> bytes:
    """The seed clients i and j both derive: HKDF-SHA256 of their X25519 shared secret."""
    shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=context).derive(shared)


def mask_from_seed(seed: bytes, size: int) -> np.ndarray:
    """`size` uint32 words of ChaCha20 keystream (a cryptographic PRG) keyed by `seed`."""
    encryptor = Cipher(algorithms.ChaCha20(seed, b"\x00" * 16), mode=None).encryptor()
    stream = encryptor.update(b"\x00" * (4 * size))
    return np.frombuffer(stream, dtype=np.uint32).copy()


def round_context(run: str, round_index: int, attempt: int) -> bytes:
    """What makes each round's (and each retry's) masks fresh."""
    return f"kiln-secagg|{run}|{round_index}|{attempt}".encode()


def masked_update(
    values: np.ndarray,
    my_id: int,
    private: X25519PrivateKey,
    peers: dict[int, bytes],
    context: bytes,
) -> np.ndarray:
    """quantize(values) plus this client's pairwise masks, mod 2^32 (uint32 wraps)."""
    out = quantize(values)
    for peer_id, peer_public in sorted(peers.items()):
        if peer_id == my_id:
            continue
        mask = mask_from_seed(pair_seed(private, peer_public, context), out.size)
        if my_id < peer_id:
            out += mask
        else:
            out -= mask
    return out


def unmasked_sum(masked: list[np.ndarray]) -> np.ndarray:
    """The sum of every client's masked vector: the masks cancel; floats out."""
    total = np.zeros(masked[0].shape, dtype=np.uint32)
    for vector in masked:
        total += vector
    return dequantize(total)
