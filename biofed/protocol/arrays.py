"""Typed arrays on the wire: msgpack ExtType code 1.

The ext data is ``dtype code (1 byte) | ndim (1 byte) | ndim little-endian uint64 dims |
raw little-endian bytes``; only float32, float64, int32, int64 and uint8 exist, and the
byte length must equal ``prod(shape) * itemsize``. Decoded arrays are read-only views of
the message.
"""

from __future__ import annotations

import math
import struct

import msgpack
import numpy as np

from biofed.protocol.errors import InvalidPayload, MalformedMessage

# Wire dtype codes. Explicit little-endian so big-endian hosts agree with everybody else.
_DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype("<f4"),
    2: np.dtype("<f8"),
    3: np.dtype("<i4"),
    4: np.dtype("<i8"),
    5: np.dtype("u1"),
}
_CODE_OF_DTYPE = {dtype: code for code, dtype in _DTYPE_CODES.items()}
ALLOWED_DTYPES = ("float32", "float64", "int32", "int64", "uint8")
_ARRAY_EXT = 1
_MAX_NDIM = 8


def encode_array(array: np.ndarray) -> msgpack.ExtType:
    """The ExtType of ``array``; :class:`~biofed.protocol.errors.InvalidPayload` for a dtype
    outside :data:`ALLOWED_DTYPES` or more than 8 dimensions.

    Examples
    --------
    >>> ext = encode_array(np.arange(3, dtype=np.int32))
    >>> decode_array(ext.code, ext.data)
    array([0, 1, 2], dtype=int32)
    """
    if array.dtype.kind == "O":
        raise InvalidPayload("object arrays cannot be sent; convert to a numeric dtype")
    wire = array.dtype.newbyteorder("<") if array.dtype.itemsize > 1 else array.dtype
    code = _CODE_OF_DTYPE.get(wire)
    if code is None:
        raise InvalidPayload(
            f"array dtype {array.dtype} cannot be sent; use one of {', '.join(ALLOWED_DTYPES)} "
            f"(e.g. .astype(np.float32))"
        )
    if array.ndim > _MAX_NDIM:
        raise InvalidPayload(f"array has {array.ndim} dimensions; at most {_MAX_NDIM} are supported")
    data = np.ascontiguousarray(array, dtype=wire)
    header = struct.pack(f"<BB{array.ndim}Q", code, array.ndim, *array.shape)
    return msgpack.ExtType(_ARRAY_EXT, header + data.tobytes())


def decode_array(code: int, data: bytes) -> np.ndarray:
    """The array of an ExtType (msgpack's ``ext_hook``): a read-only view of ``data`` in native
    byte order; :class:`~biofed.protocol.errors.MalformedMessage` for any inconsistency."""
    if code != _ARRAY_EXT:
        raise MalformedMessage(f"unknown msgpack extension type {code}")
    if len(data) < 2:
        raise MalformedMessage("typed array header is truncated")
    dtype = _DTYPE_CODES.get(data[0])
    if dtype is None:
        raise MalformedMessage(f"typed array has unknown dtype code {data[0]} (object dtype is never allowed)")
    ndim = data[1]
    if ndim > _MAX_NDIM:
        raise MalformedMessage(f"typed array declares {ndim} dimensions; at most {_MAX_NDIM} are allowed")
    header_len = 2 + 8 * ndim
    if len(data) < header_len:
        raise MalformedMessage("typed array shape is truncated")
    shape = struct.unpack_from(f"<{ndim}Q", data, 2)
    expected = math.prod(shape) * dtype.itemsize
    if expected != len(data) - header_len:
        raise MalformedMessage(
            f"typed array of shape {shape} and dtype {dtype.name} needs {expected} bytes, "
            f"message carries {len(data) - header_len}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=False)


__all__ = ["ALLOWED_DTYPES", "decode_array", "encode_array"]
