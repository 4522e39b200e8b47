"""Gradient compression: compressors, error feedback and compressed communication.

    from labkit.compress import make_compressor, CompressedCommunicator
    compressor = make_compressor("topk", ratio=0.01)          # error feedback on by default
    packet = compressor.compress(grad, key="fc1.weight")       # packet.nbytes: bytes on the wire
    approx = compressor.decompress(packet)                     # shape and dtype of grad
    CompressedCommunicator(comm, compressor).allreduce(grad, key="fc1.weight")  # sum over ranks, in place

The split into Compressor, Memory (error feedback) and Communicator follows GRACE
(``base.py`` explains it, ``docs/compression.md`` compares the compressors). Each
compressor is one short file; importing this package registers them all in
``labkit.registry.COMPRESSORS``, which is where ``--compression`` finds its choices.
"""

# Each module registers its compressor; this order is the order in which the choices are listed.
# isort: off
from . import (  # noqa: F401
    none,
    fp16,
    bf16,
    eightbit,
    qsgd,
    terngrad,
    natural,
    onebit,
    signsgd,
    signum,
    efsignsgd,
    topk,
    randomk,
    threshold,
    dgc,
    powersgd,
)

# isort: on
from .base import (
    Compressor,
    Packet,
    ResidualMemory,
    available_compressors,
    make_compressor,
)
from .communicate import (
    CompressedCommunicator,
    allreduce_compressed,
    recv_compressed,
    send_compressed,
)

__all__ = ["Compressor", "Packet", "ResidualMemory", "available_compressors", "make_compressor",
           "CompressedCommunicator", "allreduce_compressed", "send_compressed", "recv_compressed"]
