"""The three roles of gradient compression, as GRACE splits them.

GRACE (Xu et al., *GRACE: A Compressed Communication Framework for Distributed Machine
Learning*, ICDCS 2021) cuts every scheme into three small parts:

- a **Compressor** turns a tensor into a :class:`Packet` and a packet back into a tensor;
- a **Memory** keeps what compression dropped and adds it to the next tensor of the same
  key: the error feedback of 1-bit SGD ("Distributed & Parallel Computing for Deep
  Learning", NTHU chap. 12, slides "1-Bit SGD"; Hoefler's keynote: "use lossy
  compression when sending, accumulate error locally!");
- a **Communicator** moves packets between ranks (``labkit/compress/communicate.py``):
  every compressor inherits the one-round protocol of :class:`Compressor`'s
  ``allreduce``, ``send``, ``recv`` and ``broadcast``; one that needs more rounds
  (PowerSGD) overrides them.

A :class:`Packet` holds the real on-wire encoding: sign bits packed eight to a byte,
indices in the smallest integer type that fits, values in their reduced type. Its
``nbytes`` counts every byte that crosses the wire, the header included, and
``to_wire()`` / ``Packet.from_wire()`` turn it into one flat ``uint8`` tensor and back.

Wire format (native byte order, little-endian on every platform torch supports)::

    byte 0            number of dimensions d of the original tensor
    byte 1            dtype code of the original tensor
    byte 2            number of payload fields f
    f bytes           dtype code of each field
    8 * d bytes       the shape, int64
    8 * f bytes       the element count of each field, int64
    payload           the fields' bytes, one after the other

so a packet of a d-dimensional tensor with f fields carries ``3 + f + 8 * (d + f)``
bytes of header. Compressors are built by name with :func:`make_compressor`.
"""

from __future__ import annotations

import functools
import math

import torch

from ..registry import COMPRESSORS

# dtype codes on the wire: the position in this tuple
WIRE_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
               torch.bfloat16, torch.float32, torch.float64, torch.uint16, torch.uint32)


def index_dtype(numel: int) -> torch.dtype:
    """The smallest unsigned integer type that holds every index of ``numel`` elements.

    uint8 up to 256 elements, uint16 up to 65,536, uint32 up to 2**32, int64 beyond
    (torch has no general-purpose uint64). Indices are widened to int64 only to scatter.
    """
    for dtype in (torch.uint8, torch.uint16, torch.uint32):
        if numel <= 2 ** (8 * dtype.itemsize):
            return dtype
    return torch.int64


def pack_bits(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Pack small unsigned codes (each below 2**width, width 1, 2 or 4) into bytes.

    Value i goes to byte i // (8 // width), first values in the lowest bits; the last
    byte is padded with zeros.
    """
    per_byte = 8 // width
    codes = codes.to(torch.uint8)
    padding = (-codes.numel()) % per_byte
    if padding:
        codes = torch.cat([codes, codes.new_zeros(padding)])
    slots = codes.view(-1, per_byte)
    packed = slots[:, 0].clone()
    for slot in range(1, per_byte):
        packed |= slots[:, slot] << (slot * width)
    return packed


def _unpacking_table(width: int) -> torch.Tensor:
    """Row b: the codes packed in byte value b (256 rows, 8 // width columns)."""
    shifts = torch.arange(0, 8, width, dtype=torch.uint8)
    return (torch.arange(256, dtype=torch.uint8).unsqueeze(1) >> shifts) & ((1 << width) - 1)


UNPACKING_TABLES = {width: _unpacking_table(width) for width in (1, 2, 4)}


def unpack_bits(packed: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """The first ``count`` codes packed by :func:`pack_bits`, as uint8.

    A table lookup (one row of codes per byte value) is several times faster than
    shifting and masking every byte.
    """
    codes = torch.index_select(UNPACKING_TABLES[width].to(packed.device), 0, packed.int())
    return codes.view(-1)[:count]


class Packet:
    """What one rank sends for one tensor: the original shape and dtype, and the fields.

    ``fields`` are flat tensors in the order the compressor defines (for example the
    packed sign bits, then the two means, for 1-bit SGD).
    """

    def __init__(self, shape, dtype: torch.dtype, fields: list[torch.Tensor]):
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.fields = [field.reshape(-1) for field in fields]

    @property
    def header_nbytes(self) -> int:
        return 3 + len(self.fields) + 8 * (len(self.shape) + len(self.fields))

    @property
    def payload_nbytes(self) -> int:
        return sum(field.numel() * field.element_size() for field in self.fields)

    @property
    def nbytes(self) -> int:
        """Every byte that crosses the wire: header and payload."""
        return self.header_nbytes + self.payload_nbytes

    def to_wire(self) -> torch.Tensor:
        """The packet as one flat uint8 tensor of ``nbytes`` bytes."""
        codes = [len(self.shape), WIRE_DTYPES.index(self.dtype), len(self.fields)]
        codes += [WIRE_DTYPES.index(field.dtype) for field in self.fields]
        device = self.fields[0].device if self.fields else None
        sizes = torch.tensor(list(self.shape) + [field.numel() for field in self.fields],
                             dtype=torch.int64, device=device)
        parts = [torch.tensor(codes, dtype=torch.uint8, device=device), sizes.view(torch.uint8)]
        parts += [field.contiguous().view(torch.uint8) for field in self.fields]
        return torch.cat(parts)

    @classmethod
    def from_wire(cls, wire: torch.Tensor) -> "Packet":
        """Read back a packet written by :meth:`to_wire`."""
        ndim, dtype_code, nfields = wire[:3].tolist()
        field_dtypes = [WIRE_DTYPES[code] for code in wire[3:3 + nfields].tolist()]
        start = 3 + nfields
        end = start + 8 * (ndim + nfields)
        sizes = wire[start:end].clone().view(torch.int64).tolist()
        shape, counts = sizes[:ndim], sizes[ndim:]
        announced = end + sum(count * dtype.itemsize for dtype, count in zip(field_dtypes, counts))
        if announced != wire.numel():
            raise ValueError(f"packet: header announces {announced} bytes, the buffer has {wire.numel()}")
        fields = []
        for dtype, count in zip(field_dtypes, counts):
            fields.append(wire[end:end + count * dtype.itemsize].clone().view(dtype))
            end += count * dtype.itemsize
        return cls(shape, WIRE_DTYPES[dtype_code], fields)

    def __repr__(self) -> str:
        kinds = ", ".join(f"{f.numel()} x {str(f.dtype).removeprefix('torch.')}" for f in self.fields)
        return f"Packet(shape={tuple(self.shape)}, fields=[{kinds}], nbytes={self.nbytes})"


class ResidualMemory:
    """Error feedback: keep what compression dropped, add it to the next tensor.

    1-bit SGD (Seide et al., Interspeech 2014), as on the NTHU slides "1-Bit SGD"::

        G_quant(t) = Q(G(t) + Delta(t - 1))        Delta(t) = G(t) + Delta(t - 1) - Q^-1(G_quant(t))

    One residual per key (a parameter's name, or "grad" for a flat gradient buffer).
    """

    def __init__(self):
        self.residuals: dict = {}

    def compensate(self, tensor: torch.Tensor, key) -> torch.Tensor:
        """The tensor plus what was left over last time for this key."""
        residual = self.residuals.get(key)
        if residual is None:
            return tensor
        if residual.shape != tensor.shape:
            raise ValueError(f"error feedback: key {key!r} held a tensor of shape "
                             f"{tuple(residual.shape)}, now {tuple(tensor.shape)}; use one key per tensor")
        return tensor + residual

    def update(self, compensated: torch.Tensor, sent: torch.Tensor, key) -> None:
        """Remember what the packet did not carry."""
        self.residuals[key] = compensated - sent


class Compressor:
    """One compression scheme. Subclasses write ``encode`` and ``decompress``.

    ``compress`` wraps ``encode`` in the error feedback of the memory (when there is
    one): it compresses the tensor plus the residual, then keeps the new residual.
    """

    name = "abstract"  # set by register_compressor, with summable and unbiased
    summable = False  # packets of different ranks can be added field by field
    unbiased = False  # E[decompress(compress(x))] == x
    variable_size = False  # packet size depends on the values, not only on the shape
    layerwise = False  # needs each layer's own shape (PowerSGD): never one flat buffer

    def __init__(self, error_feedback: bool = True):
        self.memory = self.make_memory() if error_feedback else None

    def make_memory(self) -> ResidualMemory:
        return ResidualMemory()

    def compress(self, tensor: torch.Tensor, key=None) -> Packet:
        if not tensor.is_floating_point():
            raise ValueError(f"compressor {self.name!r}: expected a floating-point tensor, got {tensor.dtype}")
        if self.memory is not None:
            tensor = self.memory.compensate(tensor, key)
        packet = self.encode(tensor, key)
        if self.memory is not None:
            self.memory.update(tensor, self.decompress(packet), key)
        return packet

    def encode(self, tensor: torch.Tensor, key) -> Packet:
        raise NotImplementedError

    def decompress(self, packet: Packet) -> torch.Tensor:
        raise NotImplementedError

    def residual(self, key=None) -> torch.Tensor | None:
        """What error feedback holds for ``key`` (None before the first step or without it)."""
        return None if self.memory is None else self.memory.residuals.get(key)

    # --- the protocol across ranks (labkit/compress/communicate.py) ----------------------------
    def allreduce(self, comm, tensor: torch.Tensor, key=None) -> torch.Tensor:
        """The sum over ranks of every rank's decompressed ``tensor``."""
        from .communicate import allreduce_packets

        return allreduce_packets(comm, self, tensor, key)

    def send(self, comm, tensor: torch.Tensor, dst: int, key=None, tag: int = 0) -> None:
        from .communicate import send_compressed

        send_compressed(comm, self, tensor, dst, key, tag)

    def recv(self, comm, like: torch.Tensor, src: int | None = None, tag: int = 0) -> tuple[torch.Tensor, int]:
        """(the decompressed tensor, the sender) of what ``send`` sent."""
        from .communicate import recv_compressed

        return recv_compressed(comm, self, like, src, tag)

    def broadcast(self, comm, tensor: torch.Tensor, src: int = 0, key=None) -> torch.Tensor:
        from .communicate import broadcast_compressed

        return broadcast_compressed(comm, self, tensor, src, key)

    def check(self, param: str, value, ok: bool, allowed: str) -> None:
        if not ok:
            raise ValueError(f"compressor {self.name!r}: parameter {param!r} must be {allowed}, got {value!r}")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}, error feedback {'on' if self.memory else 'off'}>"


class SparseCompressor(Compressor):
    """Base of the sparsifiers: a packet holds the kept indices and their values.

    Subclasses choose the indices (``select``); the indices go in the smallest integer
    type that fits (:func:`index_dtype`), the values keep the tensor's dtype.
    """

    def select(self, flat: torch.Tensor, key) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, tensor, key):
        flat = tensor.reshape(-1)
        indices = self.select(flat, key)
        return Packet(tensor.shape, tensor.dtype, [indices.to(index_dtype(flat.numel())), flat[indices]])

    def decompress(self, packet):
        indices, values = packet.fields
        dense = values.new_zeros(packet.shape.numel(), dtype=packet.dtype)
        dense[indices.long()] = values
        return dense.view(packet.shape)


def kept_count(ratio: float, numel: int) -> int:
    """How many of ``numel`` values a sparsifier keeps at density ``ratio`` (at least one)."""
    return min(numel, max(1, round(ratio * numel)))


def register_compressor(name: str, *, help: str, params: dict, summable: bool, unbiased: bool):
    """Class decorator: register a compressor in ``labkit.registry.COMPRESSORS``.

    ``params`` maps each parameter to its default (whose type is the parameter's type);
    the configuration layer validates ``--compression-param`` against it, and calls
    ``meta["validate"]`` for the range checks the compressor itself makes.
    """

    def add(cls):
        cls.name, cls.summable, cls.unbiased = name, summable, unbiased
        return COMPRESSORS.register(name, help=help, params=dict(params), summable=summable,
                                    unbiased=unbiased, validate=functools.partial(params_problem, name))(cls)

    return add


def available_compressors() -> list[str]:
    return COMPRESSORS.names()


def make_compressor(name: str, error_feedback: bool = True, **params) -> Compressor:
    """The compressor registered as ``name``, with its defaults overridden by ``params``."""
    if name not in COMPRESSORS:
        raise ValueError(f"unknown compressor {name!r}; choose one of {', '.join(available_compressors())}")
    entry = COMPRESSORS.entry(name)
    defaults = entry.meta["params"]
    for param, value in params.items():
        if param not in defaults:
            allowed = ", ".join(defaults) if defaults else "no parameters"
            raise ValueError(f"compressor {name!r}: unknown parameter {param!r} (allowed: {allowed})")
        params[param] = _as_type_of(name, param, value, defaults[param])
    return entry.obj(**{**defaults, **params}, error_feedback=error_feedback)


def params_problem(name: str, params: dict) -> str | None:
    """The message make_compressor would raise for ``params``, or None if they are fine."""
    try:
        make_compressor(name, error_feedback=False, **params)
    except ValueError as error:
        return str(error)
    return None


def _as_type_of(name: str, param: str, value, default):
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"compressor {name!r}: parameter {param!r} must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"compressor {name!r}: parameter {param!r} must be a number, got {value!r}")
    if isinstance(default, int):
        if not float(value).is_integer():
            raise ValueError(f"compressor {name!r}: parameter {param!r} must be a whole number, got {value!r}")
        return int(value)
    return float(value)
