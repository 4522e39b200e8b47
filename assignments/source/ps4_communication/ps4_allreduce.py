"""Ring and tree allreduce on comm.send / comm.recv only: in place, the sum over all ranks."""
import torch


def ring_allreduce(comm, tensor):
    """Reduce-scatter then allgather around the ring: 2(N-1) steps."""
    ### BEGIN SOLUTION
    n, rank = comm.size, comm.rank
    if n == 1:
        return tensor
    chunks = tensor.view(-1).tensor_split(n)
    right, left = (rank + 1) % n, (rank - 1) % n
    for step in range(2 * (n - 1)):
        if step < n - 1:
            send, receive = (rank - step) % n, (rank - step - 1) % n
        else:
            s = step - (n - 1)
            send, receive = (rank + 1 - s) % n, (rank - s) % n
        incoming = torch.empty_like(chunks[receive])
        if rank % 2 == 0:
            comm.send(chunks[send], right)
            comm.recv(incoming, left)
        else:
            comm.recv(incoming, left)
            comm.send(chunks[send], right)
        if step < n - 1:
            chunks[receive].add_(incoming)
        else:
            chunks[receive].copy_(incoming)
    return tensor
    ### END SOLUTION


def tree_allreduce(comm, tensor):
    """Reduce up the binary tree to rank 0, then broadcast back down."""
    ### BEGIN SOLUTION
    n, rank = comm.size, comm.rank
    children = [child for child in (2 * rank + 1, 2 * rank + 2) if child < n]
    incoming = torch.empty_like(tensor)
    for child in children:
        comm.recv(incoming, child)
        tensor.add_(incoming)
    if rank != 0:
        parent = (rank - 1) // 2
        comm.send(tensor, parent)
        comm.recv(tensor, parent)
    for child in children:
        comm.send(tensor, child)
    return tensor
    ### END SOLUTION
