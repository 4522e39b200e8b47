"""PowerSGD: a rank-r approximation of each gradient matrix by one power iteration."""

from __future__ import annotations

import torch

from .base import Compressor, Packet, register_compressor


def orthogonalize(matrix: torch.Tensor, eps: float = 1e-30) -> torch.Tensor:
    """Gram-Schmidt, in place: the columns of ``matrix`` become orthonormal."""
    for i in range(matrix.shape[1]):
        column = matrix[:, i]
        column.div_(torch.linalg.vector_norm(column).clamp_min(eps))
        rest = matrix[:, i + 1:]
        rest.sub_(column.unsqueeze(1) * (column @ rest))
    return matrix


@register_compressor("powersgd", help="PowerSGD: rank-`rank` factors P, Q of each gradient matrix "
                                      "(one power iteration, warm-started); vectors go uncompressed",
                     params={"rank": 2}, summable=True, unbiased=False)
class PowerSGDCompressor(Compressor):
    """PowerSGD (Vogels et al., *PowerSGD: Practical Low-Rank Gradient Compression for
    Distributed Optimization*, NeurIPS 2019), one of the "communication optimizations"
    of Hoefler's keynote, with the error feedback of the "1-Bit SGD" slides.

    A gradient of shape (n, ...) is seen as an n x m matrix M. With Q (m x r) from the
    previous step of the same key (the warm start; random at first):

        P = M Q,   P <- orthogonalize(P),   Q = M^T P,   M ~ P Q^T

    Across ranks P and Q are sums: :meth:`allreduce` allreduces P between the two
    products and Q after them (two rounds), so every rank ends with the same P and Q
    and the same warm start. The starting Q comes from a generator seeded identically
    on every rank: compress the same keys in the same order everywhere. Vectors (1-D
    tensors, such as biases) are sent uncompressed.

    It needs each weight's own shape (``layerwise``): the allreduce mode compresses
    layer by layer instead of its one flat buffer.

    On the wire: P (n x r) and Q (m x r) in the tensor's dtype, r = min(rank, n, m); a
    vector as it is.
    """

    layerwise = True

    def __init__(self, rank: int, error_feedback: bool = True):
        super().__init__(error_feedback)
        self.check("rank", rank, rank >= 1, "a whole number >= 1")
        self.rank = rank
        self.warm_start: dict = {}
        self.generator = torch.Generator().manual_seed(0)

    def as_matrix(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.reshape(tensor.shape[0], -1)

    def first_factor(self, matrix: torch.Tensor, key) -> torch.Tensor:
        """P = M Q, with Q the warm start of ``key``."""
        rank = min(self.rank, *matrix.shape)
        q = self.warm_start.get(key)
        if q is None or q.shape != (matrix.shape[1], rank) or q.dtype != matrix.dtype:
            q = torch.randn(matrix.shape[1], rank, generator=self.generator, dtype=matrix.dtype).to(matrix.device)
        return matrix @ q

    def second_factor(self, matrix: torch.Tensor, p: torch.Tensor, key) -> torch.Tensor:
        """Q = M^T P after orthogonalizing P in place; Q is kept as the next warm start."""
        q = matrix.T @ orthogonalize(p)
        self.warm_start[key] = q
        return q

    def encode(self, tensor, key):
        if tensor.dim() < 2:
            return Packet(tensor.shape, tensor.dtype, [tensor.reshape(-1).clone()])
        matrix = self.as_matrix(tensor)
        p = self.first_factor(matrix, key)
        q = self.second_factor(matrix, p, key)
        return Packet(tensor.shape, tensor.dtype, [p, q])

    def allreduce(self, comm, tensor, key=None):
        """Algorithm 1 of the PowerSGD paper with error feedback: two allreduce rounds."""
        memory = self.memory
        compensated = tensor if memory is None else memory.compensate(tensor, key)
        if tensor.dim() < 2:
            return comm.allreduce(compensated.clone())
        matrix = self.as_matrix(compensated)
        p = self.first_factor(matrix, key)
        comm.allreduce(p)  # round 1: P = (sum of M_i) Q, the same on every rank
        q = self.second_factor(matrix, p, key)  # this rank's Q_i = M_i^T P
        packet = Packet(tensor.shape, tensor.dtype, [p, q])
        if memory is not None:
            memory.update(compensated, self.decompress(packet), key)
        comm.allreduce(q)  # round 2: sum of Q_i, in place, so it is also every rank's warm start
        return self.decompress(packet)

    def decompress(self, packet):
        if len(packet.fields) == 1:
            return packet.fields[0].view(packet.shape)
        p, q = packet.fields
        rows = packet.shape[0]
        rank = p.numel() // rows
        return (p.view(rows, rank) @ q.view(-1, rank).T).view(packet.shape)
