"""Read a GGUF file's header quickly: architecture, name and parameter count.

``gguf.GGUFReader`` builds numpy views of every metadata field, which takes
seconds for a 150k-token vocabulary; this reader skips over values with
``struct`` on a memory map and only decodes the few keys it needs.  Used to
pick the de-quantisation dtype before loading and to reject non-GGUF files early.

It also works out where the last tensor's data ends (tensor offsets, ggml
types and ``general.alignment``), so :func:`check_gguf_complete` can tell a
truncated download from a whole file without reading the data.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelFileError

_MAGIC = b"GGUF"
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_WANTED = {"general.architecture", "general.name"}
_ALIGNMENT_KEY = "general.alignment"
DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class GGUFInfo:
    """What the header says about a GGUF file."""

    version: int
    n_tensors: int
    n_params: int
    architecture: str | None
    name: str | None
    file_size: int = 0
    data_end: int | None = None  # byte where the last tensor's data ends; None if a ggml type is unknown


class _Cursor:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str):
        values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string(self) -> bytes:
        n = self.unpack("Q")
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw

    def skip_value(self, vtype: int) -> None:
        if vtype in _SCALAR:
            self.pos += struct.calcsize(_SCALAR[vtype])
        elif vtype == _STRING:
            self.pos += 8 + self.unpack("Q")
        elif vtype == _ARRAY:
            etype, count = self.unpack("IQ")
            if etype in _SCALAR:
                self.pos += count * struct.calcsize(_SCALAR[etype])
            else:
                for _ in range(count):
                    self.skip_value(etype)
        else:
            raise ValueError(f"unknown GGUF value type {vtype}")


def read_gguf_info(path: str | Path) -> GGUFInfo:
    """Parse the header of a GGUF file; raise :class:`ModelFileError` if it is not one."""
    path = Path(path)
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != _MAGIC:
                raise ModelFileError(f"{path} is not a GGUF file (magic {bytes(buf[:4])!r})")
            cur = _Cursor(buf)
            cur.pos = 4
            version, n_tensors, n_kv = cur.unpack("IQQ")
            meta: dict[str, str] = {}
            alignment = DEFAULT_ALIGNMENT
            for _ in range(n_kv):
                key = cur.string().decode("utf-8", "replace")
                vtype = cur.unpack("I")
                if key in _WANTED and vtype == _STRING:
                    meta[key] = cur.string().decode("utf-8", "replace")
                elif key == _ALIGNMENT_KEY and vtype in (4, 10):  # uint32 (spec) or uint64
                    alignment = int(cur.unpack(_SCALAR[vtype])) or DEFAULT_ALIGNMENT
                else:
                    cur.skip_value(vtype)
            n_params = 0
            tensors: list[tuple[int, int, int]] = []  # (elements, ggml type, offset in the data section)
            for _ in range(n_tensors):
                cur.string()
                n_dims = cur.unpack("I")
                count = 1
                for _ in range(n_dims):
                    count *= cur.unpack("Q")
                ggml_type, offset = cur.unpack("IQ")
                tensors.append((count, ggml_type, offset))
                n_params += count
            if cur.pos > len(buf):
                raise ValueError(f"header runs past the end of the {len(buf)}-byte file")
            data_start = -(-cur.pos // alignment) * alignment
            data_end = _data_end(tensors, data_start)
            file_size = len(buf)
    except ModelFileError:
        raise
    except (OSError, ValueError, struct.error) as exc:
        raise ModelFileError(f"{path}: unreadable GGUF header ({exc})") from exc
    return GGUFInfo(
        version, n_tensors, n_params, meta.get("general.architecture"), meta.get("general.name"),
        file_size, data_end,
    )


def _data_end(tensors: list[tuple[int, int, int]], data_start: int) -> int | None:
    """Byte offset where the tensor data ends (None when the gguf package or a ggml type is unknown)."""
    if not tensors:
        return data_start
    try:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    except ImportError:  # pragma: no cover - gguf is a dependency; the check is skipped without it
        return None
    end = data_start
    for count, ggml_type, offset in tensors:
        try:
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            return None
        end = max(end, data_start + offset + count // block * size)
    return end


def check_gguf_complete(path: str | Path, info: GGUFInfo | None = None) -> GGUFInfo:
    """The header info of ``path``; :class:`ModelFileError` if the file is not a GGUF or is cut short."""
    info = info or read_gguf_info(path)
    if info.data_end is not None and info.file_size < info.data_end:
        raise ModelFileError(
            f"{path} is truncated: its header describes {info.n_tensors} tensors ending at byte {info.data_end:,} "
            f"but the file has {info.file_size:,} bytes"
        )
    return info
