"""Allreduce written by hand, on nothing but point-to-point messages.

Ways to sum a tensor across N ranks, so that each can be read, timed and compared
with the library's ``comm.allreduce`` (``labkit bench allreduce``) and can train a model
(``labkit train --allreduce-algorithm``):

- :func:`ring_allreduce`: reduce-scatter then allgather around a ring, 2(N-1) steps
  (the Horovod slide of "Chap. 12: Distributed & Parallel Computing for Deep Learning"),
  one blocking message at a time: the lesson.
- :func:`fast_ring_allreduce`: the same ring as gloo runs it, sends and receives posted
  at once with ``isend``/``irecv``, in pipelined segments: as fast as the library's.
- :func:`tree_allreduce`: sum up a binary tree to rank 0, then broadcast back down it.
- :func:`recursive_doubling_allreduce`: log2(N) pairwise exchanges (MPICH).
- :func:`ps_allreduce`: every worker sends to one parameter server, which sends the
  sum back ("Parameter Server vs. Allreduce" in the same chapter).
- :func:`tree_reduce`: the sum on rank 0 only, along a binomial tree (Sync EASGD).

The allreduces work in place, sum, and return the tensor they were given, like
``comm.allreduce(tensor)``. Every rank must call the same function with a tensor of
the same shape and dtype.

A word on deadlock. A send does not return until the receiver has posted the matching
receive (gloo and MPI both behave so for large messages). If every rank of a ring sent
to its right neighbour at the same moment, all would wait forever for a receive that
nobody posts. Wherever two ranks talk both ways, :func:`_exchange` breaks the symmetry:
one side sends first while the other receives first.
"""

from __future__ import annotations

import threading
from collections import deque

import torch

from .base import Communicator

# One tag per algorithm, so that the messages of two different collectives can never
# be mistaken for each other (the parameter server receives from any source).
RING_TAG = 101
TREE_TAG = 102
DOUBLING_TAG = 103
PS_TAG = 104
FAST_RING_TAG = 1000  # + direction; messages between two ranks with one tag arrive in order
SEGMENT_BYTES = 4 << 20  # as NCCL_BUFFSIZE: 4 MB
MAX_SEGMENTS = 64  # per chunk: segments grow for larger chunks
PIPELINE_DEPTH = 2  # segments in flight per direction, as in gloo's ring
# operations whose receive is posted before their send is due (each holds a scratch segment):
# 0 posts each receive just before its own send; earlier ones kept more buffers hot and
# did not make gloo faster on shared cores (docs/collectives.md)
RECEIVE_AHEAD = 0
_SCRATCH = threading.local()  # the fast ring's receive buffers, reused between calls


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    """A 1-D contiguous tensor over the same numbers: a view if possible, else a copy."""
    return tensor.view(-1) if tensor.is_contiguous() else tensor.reshape(-1)


def _finish(tensor: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """Write the result back when ``flat`` had to be a copy; return ``tensor``."""
    if not tensor.is_contiguous():
        tensor.copy_(flat.view(tensor.shape))
    return tensor


def _exchange(comm: Communicator, outgoing: torch.Tensor, dst: int, incoming: torch.Tensor,
              src: int, tag: int, send_first: bool) -> None:
    """Send ``outgoing`` to ``dst`` and receive ``incoming`` from ``src``.

    Blocking sends deadlock if both sides of a pair send at once, so the caller says
    which side goes first; the two ranks of every pair must pass opposite values.
    Empty tensors are not sent at all (both sides know the sizes, so both skip).
    """
    if send_first:
        if outgoing.numel():
            comm.send(outgoing, dst, tag)
        if incoming.numel():
            comm.recv(incoming, src, tag)
    else:
        if incoming.numel():
            comm.recv(incoming, src, tag)
        if outgoing.numel():
            comm.send(outgoing, dst, tag)


# --- ring --------------------------------------------------------------------------------
def ring_allreduce(comm: Communicator, tensor: torch.Tensor) -> torch.Tensor:
    """Ring allreduce: reduce-scatter, then allgather, 2(N-1) steps in all.

    Source: "Horovod: Ring Allreduce" ("2*(N-1) iterations: N-1 Adds, N-1 Send&Recv"),
    Chap. 12, Distributed & Parallel Computing for Deep Learning (NTHU); the algorithm is
    Patarasuk & Yuan, "Bandwidth optimal all-reduce algorithms for clusters of
    workstations", JPDC 2009.

    The tensor is cut into N chunks. Each rank sends only to its right neighbour and
    receives only from its left one, one chunk per step, so every link carries the same
    load and each rank sends 2(N-1)/N of the tensor in total, whatever N is.
    """
    n, rank = comm.size, comm.rank
    if n == 1 or tensor.numel() == 0:
        return tensor
    flat = _flat(tensor)
    # N contiguous views into the flat tensor. When N does not divide the length, the
    # first (length mod N) chunks are one element longer; when the length is below N,
    # some chunks are empty.
    chunks = flat.tensor_split(n)
    right, left = (rank + 1) % n, (rank - 1) % n
    # Even ranks send first, odd ranks receive first. With an odd N, rank N-1 and rank 0
    # are both even, but rank 1 receives first, so the chain of waits always ends.
    send_first = rank % 2 == 0
    incoming = torch.empty_like(chunks[0])  # chunk 0 is a longest one: reused every step

    # Phase 1, reduce-scatter (N-1 steps). At step s, rank r passes chunk (r - s) to the
    # right and adds the chunk (r - s - 1) coming from the left to its own copy. Each
    # chunk travels around the ring collecting one more rank's contribution per step.
    for step in range(n - 1):
        send_index = (rank - step) % n
        recv_index = (rank - step - 1) % n
        received = incoming[:chunks[recv_index].numel()]
        _exchange(comm, chunks[send_index], right, received, left, RING_TAG, send_first)
        chunks[recv_index].add_(received)
    # Now chunk (r + 1) on rank r holds the sum over all ranks.

    # Phase 2, allgather (N-1 steps). At step s, rank r passes the finished chunk
    # (r + 1 - s) to the right and receives the finished chunk (r - s) from the left,
    # straight into its place: no addition, no copy.
    for step in range(n - 1):
        send_index = (rank + 1 - step) % n
        recv_index = (rank - step) % n
        _exchange(comm, chunks[send_index], right, chunks[recv_index], left, RING_TAG, send_first)
    return _finish(tensor, flat)


def fast_ring_allreduce(comm: Communicator, tensor: torch.Tensor, segment_bytes: int = SEGMENT_BYTES,
                        bidirectional: bool = False, depth: int = PIPELINE_DEPTH,
                        ahead: int = RECEIVE_AHEAD) -> torch.Tensor:
    """Ring allreduce as gloo runs it: sends and receives at once, in pipelined segments.

    The same 2(N-1) steps as :func:`ring_allreduce`, with what gloo's ring
    (``gloo/allreduce.cc``) adds to Patarasuk & Yuan's:

    - a rank's receives and sends are posted with ``irecv``/``isend`` and waited on
      later, so it receives from its left while it sends to its right and no
      send-first/receive-first order is needed;
    - each chunk moves as segments of about ``segment_bytes`` (at most ``MAX_SEGMENTS`` a
      chunk), ``depth`` of them in flight: the add of one segment overlaps the transfer
      of the next;
    - each receive is posted before the send of the same operation (``ahead``
      operations earlier still, if asked), so that the neighbour's send finds it waiting
      (in gloo a send waits until the receiver has said it is ready);
    - the received segments land in scratch buffers kept from call to call (no
      allocation, and a buffer just added is still in cache when it is reused);
    - ``bidirectional``: half of the tensor goes round to the right and half to the left
      (what NCCL does to use both directions of every link).

    On a machine where the ranks share a few cores every message costs CPU time (Python,
    a request, thread wake-ups), so the defaults send few, large messages: with 4 MB
    segments a 16 MB tensor on 4 ranks goes round in one message per step, one way
    (docs/collectives.md has the measurements). Every rank sends 2(N-1)/N of the tensor.
    """
    n = comm.size
    if n == 1 or tensor.numel() == 0:
        return tensor
    flat = _flat(tensor)
    parts = flat.tensor_split(2) if bidirectional else (flat,)
    rings = [_RingPipeline(comm, part, way, segment_bytes, depth, ahead) for way, part in enumerate(parts)]
    for index in range(max(len(ring.ops) for ring in rings)):
        for ring in rings:
            if index < len(ring.ops):  # the halves may differ by one element
                ring.post(index)
    for ring in rings:
        ring.drain()
    return _finish(tensor, flat)


def _scratch(like: torch.Tensor, way: int, count: int, numel: int) -> list[torch.Tensor]:
    """``count`` receive buffers of ``numel`` elements, kept per thread between calls."""
    pool = _SCRATCH.__dict__.setdefault("buffers", {})
    key = (like.dtype, like.device, way)
    buffers = pool.get(key)
    if buffers is None or len(buffers) < count or buffers[0].numel() < numel:
        buffers = pool[key] = [like.new_empty(numel) for _ in range(count)]
    return [buffer[:numel] for buffer in buffers[:count]]


class _RingPipeline:
    """One direction of :func:`fast_ring_allreduce` as a list of operations.

    Operation i is step ``i // k``, segment ``i % k`` (k segments a chunk): send segment
    ``i % k`` of chunk ``rank - d * step`` to the next rank, receive the same segment of
    chunk ``rank - d * (step + 1)`` from the previous one (d = +1 or -1, the direction).
    In the first N-1 steps the received segment lands in a scratch buffer and is added to
    this rank's copy (reduce-scatter); in the last N-1 it lands in its place (allgather).

    At most ``depth`` operations are in flight, and the receive of an operation is posted
    ``ahead`` operations before its send, so that the sender finds it posted and writes at
    once. What makes this exact: operation i sends what operation i - k received and
    added (finished, as k >= depth); a receive in place at operation m overwrites what
    operation m - (N-1)k sent (finished, as ahead <= (N-1)k - depth, and that send waited
    on first; other sends are waited on at the end); a scratch buffer is reused
    depth + ahead operations later, when its add is done.
    """

    def __init__(self, comm: Communicator, part: torch.Tensor, way: int, segment_bytes: int, depth: int,
                 ahead: int):
        n, rank = comm.size, comm.rank
        d = 1 if way == 0 else -1
        chunks = part.tensor_split(n)
        longest = chunks[0].numel()
        per_chunk = min(MAX_SEGMENTS, max(1, -(-longest * part.element_size() // max(1, segment_bytes))))
        pieces = [chunk.tensor_split(per_chunk) for chunk in chunks]
        self.depth = max(1, min(depth, per_chunk))
        self.ahead = max(0, min(ahead, (n - 1) * per_chunk - self.depth))
        self.comm, self.tag = comm, FAST_RING_TAG + way
        self.right, self.left = (rank + d) % n, (rank - d) % n
        self.buffers = _scratch(part, way, self.depth + self.ahead, pieces[0][0].numel())
        self.reducing = (n - 1) * per_chunk  # operations before this index add what they receive
        self.ops = [(pieces[(rank - d * step) % n][segment], pieces[(rank - d * (step + 1)) % n][segment])
                    for step in range(2 * (n - 1)) for segment in range(per_chunk)]
        self.receives: dict = {}
        self.posted = 0  # receives posted so far
        self.in_flight: deque = deque()
        self.sending: deque = deque()  # (index, request) of sends not yet waited on

    def post(self, index: int) -> None:
        """Start operation ``index``: its receive (if not yet posted) and those ``ahead``
        of it, then its send, once fewer than ``depth`` operations are in flight."""
        if len(self.in_flight) == self.depth:
            self._complete()
        while self.posted <= min(index + self.ahead, len(self.ops) - 1):
            self._post_receive(self.posted)
            self.posted += 1
        outgoing = self.ops[index][0]
        send = self.comm.isend(outgoing, self.right, self.tag) if outgoing.numel() else None
        self.in_flight.append((index, send))

    def _post_receive(self, index: int) -> None:
        target = self.ops[index][1]
        if index < self.reducing:
            into = self.buffers[index % len(self.buffers)][:target.numel()]
        else:
            into = target  # what operation index - (N-1)k sent from here must be out
            while self.sending and self.sending[0][0] <= index - self.reducing:
                self.sending.popleft()[1].wait()
        request = self.comm.irecv(into, self.left, self.tag) if target.numel() else None
        self.receives[index] = (request, into, target)

    def _complete(self) -> None:
        """Wait for the oldest operation; add what it received if it is a reduce."""
        index, send = self.in_flight.popleft()
        receive, into, target = self.receives.pop(index)
        if receive is not None:
            receive.wait()
            if into is not target:
                target.add_(into)
        if send is not None:
            self.sending.append((index, send))  # waited on only when its memory is needed

    def drain(self) -> None:
        while self.in_flight:
            self._complete()
        while self.sending:
            self.sending.popleft()[1].wait()


# --- binary tree --------------------------------------------------------------------------
def tree_children(rank: int, n: int) -> list[int]:
    """Children of ``rank`` in the binary tree over ranks 0..n-1 (rank r's are 2r+1, 2r+2)."""
    return [child for child in (2 * rank + 1, 2 * rank + 2) if child < n]


def tree_parent(rank: int) -> int:
    """Parent of ``rank`` (not 0) in the binary tree."""
    return (rank - 1) // 2


def tree_allreduce(comm: Communicator, tensor: torch.Tensor) -> torch.Tensor:
    """Binary-tree allreduce: reduce up the tree to rank 0, then broadcast back down.

    Source: the tree reduction of "Sync EASGD1: P blocking send/receive operations can be
    efficiently processed by a tree-reduction operation (standard MPI reduction)",
    You, Buluc & Demmel, "Scaling Deep Learning on GPU and Knights Landing clusters",
    SC'17.

    Rank r's children are 2r+1 and 2r+2, so the tree is log2(N) levels deep. Every rank
    but 0 sends the whole tensor once up and each parent sends it once to each child:
    latency grows only with log2(N), but every message carries all S bytes.
    """
    n, rank = comm.size, comm.rank
    if n == 1 or tensor.numel() == 0:
        return tensor
    flat = _flat(tensor)
    children = tree_children(rank, n)

    # Reduce: wait for each child's partial sum (its whole subtree) and add it in.
    if children:
        incoming = torch.empty_like(flat)
        for child in children:
            comm.recv(incoming, child, TREE_TAG)
            flat.add_(incoming)
    # Pass this subtree's sum to the parent, then wait for the total to come back.
    # A tree has no cycle, so blocking sends cannot deadlock here.
    if rank != 0:
        parent = tree_parent(rank)
        comm.send(flat, parent, TREE_TAG)
        comm.recv(flat, parent, TREE_TAG)
    # Broadcast: hand the total to each child, which does the same for its subtree.
    for child in children:
        comm.send(flat, child, TREE_TAG)
    return _finish(tensor, flat)


# --- recursive doubling ---------------------------------------------------------------------
def recursive_doubling_allreduce(comm: Communicator, tensor: torch.Tensor) -> torch.Tensor:
    """Recursive doubling: log2(N) steps of pairwise exchange at distance 1, 2, 4, ...

    Source: Thakur, Rabenseifner & Gropp, "Optimization of collective communication
    operations in MPICH", IJHPCA 2005 (the allreduce of section 4.4, with the
    non-power-of-two fold of Rabenseifner's algorithm).

    After step k every rank holds the sum over a block of 2^(k+1) ranks, so after
    log2(N) steps each holds the total: few steps (good for latency), but every step
    moves the whole tensor (poor for bandwidth). When N is not a power of two, the
    ``extra = N - 2^floor(log2 N)`` surplus ranks are first folded into a neighbour and
    get the result back at the end: two more steps.
    """
    n, rank = comm.size, comm.rank
    if n == 1 or tensor.numel() == 0:
        return tensor
    flat = _flat(tensor)
    incoming = torch.empty_like(flat)
    active = 1 << (n.bit_length() - 1)  # largest power of two <= N
    extra = n - active

    # Fold: among the first 2*extra ranks, each odd rank hands its tensor to the even
    # rank below it and waits for the result. The others go on as `active` ranks,
    # renumbered 0..active-1.
    if rank < 2 * extra:
        if rank % 2 == 1:
            comm.send(flat, rank - 1, DOUBLING_TAG)
            comm.recv(flat, rank - 1, DOUBLING_TAG)
            return _finish(tensor, flat)
        comm.recv(incoming, rank + 1, DOUBLING_TAG)
        flat.add_(incoming)
        virtual = rank // 2
    else:
        virtual = rank - extra

    # Doubling: at distance d, exchange with the rank whose virtual number differs in bit
    # d and add. Both partners compute a + b, so both hold bit-identical sums. The lower
    # rank of each pair sends first.
    distance = 1
    while distance < active:
        partner_virtual = virtual ^ distance
        partner = 2 * partner_virtual if partner_virtual < extra else partner_virtual + extra
        _exchange(comm, flat, partner, incoming, partner, DOUBLING_TAG, send_first=rank < partner)
        flat.add_(incoming)
        distance *= 2

    # Unfold: give the folded neighbour its result.
    if rank < 2 * extra:
        comm.send(flat, rank + 1, DOUBLING_TAG)
    return _finish(tensor, flat)


# --- parameter server -----------------------------------------------------------------------
def ps_allreduce(comm: Communicator, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
    """Parameter-server allreduce: workers push to ``root``, which sums and sends back.

    Source: "Parameter Server vs. Allreduce" (workers send gradients, receive weights;
    the server link is the bottleneck), Chap. 12, Distributed & Parallel Computing for
    Deep Learning (NTHU); Li et al., "Scaling distributed machine learning with the
    parameter server", OSDI 2014.

    The root receives N-1 tensors and sends N-1 tensors: 2(N-1) messages of S bytes
    through one rank's link, against 2(N-1)/N * S per rank for the ring.
    """
    n, rank = comm.size, comm.rank
    comm._check_peer(root, "root")
    if n == 1 or tensor.numel() == 0:
        return tensor
    flat = _flat(tensor)
    if rank == root:
        # Gather and sum, in whatever order the workers' pushes arrive (any source).
        incoming = torch.empty_like(flat)
        for _ in range(n - 1):
            comm.recv(incoming, None, PS_TAG)
            flat.add_(incoming)
        # Send the sum back to every worker.
        for worker in range(n):
            if worker != root:
                comm.send(flat, worker, PS_TAG)
    else:
        comm.send(flat, root, PS_TAG)
        comm.recv(flat, root, PS_TAG)
    return _finish(tensor, flat)


# --- reduce to one rank ---------------------------------------------------------------------
def tree_reduce(comm, tensor: torch.Tensor) -> torch.Tensor | None:
    """The sum of ``tensor`` over all ranks, on rank 0, along a binomial tree (None elsewhere).

    Sync EASGD 1 (You, Buluc & Demmel, SC'17): "P blocking send/receive operations can be
    efficiently processed by a tree-reduction operation (standard MPI reduction)":
    ceil(log2 N) rounds instead of P receives in a row at the master. In the round of
    distance d (1, 2, 4, ...), a rank r with r mod 2d = d hands its partial sum to r - d
    and is done; a rank r with r mod 2d = 0 adds what r + d hands it. ``comm`` may be a
    compressing communicator: then the partial sums travel compressed.
    """
    partial, distance = tensor, 1
    while distance < comm.size:
        if comm.rank % (2 * distance) == distance:
            comm.send(partial, comm.rank - distance)
            return None
        if comm.rank + distance < comm.size:
            incoming = torch.empty_like(partial)
            comm.recv(incoming, comm.rank + distance)
            partial = partial + incoming
        distance *= 2
    return partial


ALLREDUCE_ALGORITHMS = {
    "ring": ring_allreduce,
    "tree": tree_allreduce,
    "recursive_doubling": recursive_doubling_allreduce,
    "parameter_server": ps_allreduce,
}

# ``--allreduce-algorithm``: what sums the gradients of the allreduce mode
TRAINING_ALLREDUCES = {
    "ring": fast_ring_allreduce,
    "tree": tree_allreduce,
    "recursive-doubling": recursive_doubling_allreduce,
}


class HandWrittenAllreduce:
    """``comm`` with its sum-allreduce done by a hand-written algorithm; everything else,
    and the byte counts (the algorithm's own messages), is ``comm``'s."""

    def __init__(self, comm: Communicator, algorithm):
        self.comm = comm
        self.algorithm = algorithm

    def allreduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if op != "sum":
            return self.comm.allreduce(tensor, op)
        return self.algorithm(self.comm, tensor)

    # the hand-written sum runs step by step in the caller's thread: nothing is started behind
    collectives_in_background = False

    def __getattr__(self, name):
        if name in ("iallreduce", "iallgather"):  # the library's: they would bypass the algorithm
            raise AttributeError(f"{type(self).__name__} has no {name}: its allreduce blocks")
        return getattr(self.comm, name)


def using_allreduce(comm: Communicator, name: str):
    """``comm`` for ``--allreduce-algorithm name``: itself for ``library``."""
    return comm if name == "library" else HandWrittenAllreduce(comm, TRAINING_ALLREDUCES[name])
