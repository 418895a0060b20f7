"""AES-XTS with dm-crypt's plain64 IV over whole 512-byte sectors, in bulk, in Python.

Used to decrypt (verify) LUKS2 payloads in user space, and as the reference encryptor
that cryptsetup's output is checked against. [XTS] IEEE 1619-2007, 5.3; dm-crypt plain64
IV: the 512-byte sector number, 64-bit little-endian, zero-padded to 16 bytes.
"""

from __future__ import annotations

import hmac

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SECTOR = 512
_CHUNK_SECTORS = 512  # 256 KiB per bulk step: fastest here (the buffers stay in cache)


class XtsPlain64:
    """AES-XTS over whole 512-byte sectors with dm-crypt's plain64 IV, in bulk.

    OpenSSL takes one tweak per call; one Python call per sector tops out near 100 MB/s.
    Here the masks ([XTS] 5.3) T(s, j) = E_K2(plain64(s)) * alpha^j of a whole chunk come
    from one ECB call over the sector numbers and 32 GF(2^128) doublings of all sectors at
    once, as 128-bit lanes of one Python int. XOR with T goes through CBC decryption, which
    outputs D(c_k) ^ c_(k-1): over interleaved blocks [T_i, E(v_i)] it yields v_i ^ T_i. So
    C = E(X) ^ T = cbcdec[T, E(E(X))] with X = P ^ T = cbcdec[T, E(P)], and decryption is
    P = D(Y) ^ T = cbcdec[T, Y] with Y = C ^ T = cbcdec[T, E(C)].
    """

    def __init__(self, key: bytes) -> None:
        if len(key) != 64:
            raise ValueError(f"aes-xts-plain64 with a 512-bit key needs 64 key bytes, not {len(key)}")
        if hmac.compare_digest(key[:32], key[32:]):
            raise ValueError("the two halves of an XTS key must differ")
        self._k1, self._k2 = algorithms.AES(key[:32]), algorithms.AES(key[32:])
        size = 2 * SECTOR * _CHUNK_SECTORS + 16
        self._a, self._b, self._c = bytearray(size), bytearray(size), bytearray(size)
        self._tweaks = bytearray(16 * _CHUNK_SECTORS + 16)
        self._lanes: dict[int, tuple[int, int, int]] = {}

    def encrypt(self, data: bytes | bytearray | memoryview, first_sector: int = 0) -> bytearray:
        return self._run(data, first_sector, encrypt=True)

    def decrypt(self, data: bytes | bytearray | memoryview, first_sector: int = 0) -> bytearray:
        return self._run(data, first_sector, encrypt=False)

    def _run(self, data: bytes | bytearray | memoryview, first: int, *, encrypt: bool) -> bytearray:
        view = memoryview(data).cast("B")
        if len(view) % SECTOR:
            raise ValueError(f"XTS data must be whole {SECTOR}-byte sectors, got {len(view)} bytes")
        out, step = bytearray(len(view)), SECTOR * _CHUNK_SECTORS
        for at in range(0, len(view), step):
            self._chunk(view[at : at + step], first + at // SECTOR, encrypt, memoryview(out)[at : at + step])
        return out

    def _chunk(self, data: memoryview, first: int, encrypt: bool, out: memoryview) -> None:
        pair = 2 * len(data)  # the interleaved buffers hold [T_i, v_i] for every block i
        a, b = memoryview(self._a)[:pair], memoryview(self._b)[:pair]
        aw, bw, dw = a.cast("Q"), b.cast("Q"), data.cast("Q")
        aw[2::4], aw[3::4] = dw[0::2], dw[1::2]
        self._ecb(a, self._b)  # b = [_, E(v_i)]
        self._masks(first, len(data) // SECTOR, bw)  # b = [T_i, E(v_i)]
        self._cbc_decrypt(b, self._a)  # a = [_, v_i ^ T_i]
        if encrypt:
            self._ecb(a, self._c)
            self._ecb(memoryview(self._c)[:pair], self._a)  # a = [_, E(E(X_i))]
        bw[2::4], bw[3::4] = aw[2::4], aw[3::4]
        self._cbc_decrypt(b, self._a)  # a = [_, E(X_i) ^ T_i] or [_, D(Y_i) ^ T_i]
        out.cast("Q")[0::2], out.cast("Q")[1::2] = aw[2::4], aw[3::4]

    def _ecb(self, src: memoryview, dst: bytearray) -> None:
        Cipher(self._k1, modes.ECB()).encryptor().update_into(src, dst)

    def _cbc_decrypt(self, src: memoryview, dst: bytearray) -> None:
        Cipher(self._k1, modes.CBC(bytes(16))).decryptor().update_into(src, dst)  # no padding: nothing held back

    def _masks(self, first: int, sectors: int, words: memoryview) -> None:
        """Write T(first + i, j) into slot 2(32i + j), i.e. words 4(32i + j) and the next."""
        if sectors not in self._lanes:
            ones = int.from_bytes((b"\x01" + bytes(15)) * sectors, "little")  # bit 0 of every lane
            iota = int.from_bytes(b"".join(i.to_bytes(16, "little") for i in range(sectors)), "little")
            self._lanes[sectors] = (ones, ((1 << (128 * sectors)) - 1) ^ ones, iota)
        ones, keep, iota = self._lanes[sectors]
        numbers = (first * ones + iota).to_bytes(16 * sectors, "little")  # plain64 IVs
        Cipher(self._k2, modes.ECB()).encryptor().update_into(numbers, self._tweaks)
        x = int.from_bytes(memoryview(self._tweaks)[: 16 * sectors], "little")
        for j in range(SECTOR // 16):
            lane = memoryview(x.to_bytes(16 * sectors, "little")).cast("Q")
            start, stop = 4 * j, 4 * j + 128 * (sectors - 1) + 1
            words[start:stop:128], words[start + 1 : stop + 1 : 128] = lane[0::2], lane[1::2]
            x = ((x << 1) & keep) ^ (((x >> 127) & ones) * 0x87)  # times alpha, every lane
