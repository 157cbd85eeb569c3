"""Per-objective gradient sums of one effective batch, exact under gradient accumulation and data parallelism.

Each objective's gradient (SFT, reinstatement, flashback divergence, guidance: whichever are active) is accumulated on its
own over the micro-batches of an effective batch; once the effective batch is complete (and, on several
processes, the sums are all-reduced) they are projected once by PCGrad (`pcgrad.project`): each gradient,
wherever it conflicts with another (``g_i . g_j < 0``), is projected onto that one's normal plane, and the update
is their sum. Latent banks have
row-sparse gradients and are accumulated on the rows the batch retrieved only, so the cost does not grow with the
bank size.

With one objective the sums are only reduced: it is the all-reduce of row-sparse gradients that DDP's own
bucketed reduction cannot do.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .pcgrad import Projection, project


DENSE, ABSENT = "dense", "absent"
"""How `ObjectiveGradients` reduces a parameter that is not row-sparse: in full, or not at all (no gradient)."""


class ObjectiveGradients:
    """Per-objective gradient sums over the trainable parameters of one effective batch.

    Row-sparse gradients (the latent banks') are kept as their (rows, values) pieces and assembled on the union of
    rows, over objectives and processes, at `apply` time, then written back as sparse gradients; the other rows are
    zero in every objective and do not enter the projection. A parameter is row-sparse when some process has sparse
    gradients for it and none has a dense one; otherwise its sparse pieces are added to the dense sum.

    `apply` makes two collectives on several processes, whatever the number of parameters, both on the parameters'
    device (NCCL reduces no CPU tensor): one MAX all-reduce of a byte mask holding, per parameter, whether it has
    sparse and dense gradients here and which rows it touched; then one all-reduce of the stacked flat gradients.
    """

    def __init__(self, parameters: list[torch.nn.Parameter], num_objectives: int = 2) -> None:
        if num_objectives < 1:
            raise ValueError(
                f"num_objectives must be 1 (reduce only) or more (reduce and project), got {num_objectives}."
            )
        self.parameters = parameters
        self.num_objectives = num_objectives
        self._rows = [p.shape[0] if p.dim() else 0 for p in parameters]
        self._reset()

    @property
    def device(self) -> torch.device:
        """Where the sums are reduced: the parameters' device, read at each step (the Trainer may move the model
        after this accumulator is built)."""
        return self.parameters[0].device if self.parameters else torch.device("cpu")

    def _reset(self) -> None:
        count = len(self.parameters)
        self.dense: list[list[torch.Tensor | None]] = [[None] * count for _ in range(self.num_objectives)]
        self.pieces: list[list[list[tuple[torch.Tensor, torch.Tensor]]]] = [
            [[] for _ in range(count)] for _ in range(self.num_objectives)
        ]

    def take_gradients(self) -> list[torch.Tensor | None]:
        """The parameters' ``.grad`` (moved out, leaving ``.grad`` empty for the next backward)."""
        grads = [p.grad for p in self.parameters]
        for p in self.parameters:
            p.grad = None
        return grads

    def add(self, objective: int, grads: list[torch.Tensor | None], scale: float = 1.0) -> None:
        """Add one backward's gradients, times ``scale``, to objective ``objective`` (its index among the active ones)."""
        for i, grad in enumerate(grads):
            if grad is None:
                continue
            if grad.is_sparse:
                grad = grad.coalesce()
                self.pieces[objective][i].append((grad.indices()[0], grad.values().float() * scale))
            else:
                value = grad.float() * scale
                current = self.dense[objective][i]
                self.dense[objective][i] = value if current is None else current + value

    def _local_mask(self, offsets: torch.Tensor) -> torch.Tensor:
        """``[has sparse pieces (P) | has a dense sum (P) | touched rows of every parameter]``, as bytes."""
        count = len(self.parameters)
        has_sparse = [any(pieces[i] for pieces in self.pieces) for i in range(count)]
        has_dense = [any(dense[i] is not None for dense in self.dense) for i in range(count)]
        mask = torch.zeros(2 * count + sum(self._rows), dtype=torch.uint8, device=offsets.device)
        mask[: 2 * count] = torch.tensor(has_sparse + has_dense, dtype=torch.uint8).to(offsets.device)
        rows = [
            rows.to(offsets.device) + offsets[i]
            for objective in self.pieces
            for i, pieces in enumerate(objective)
            for rows, _ in pieces
        ]
        if rows:
            mask.index_fill_(0, torch.cat(rows) + 2 * count, 1)
        return mask

    def _layout(self) -> list[torch.Tensor | str]:
        """Per parameter, as agreed by every process: the rows it is reduced on (row-sparse), ``"dense"``, or
        ``"absent"`` (no gradient in any objective on any process: its ``.grad`` stays None)."""
        offsets = torch.tensor([0, *self._rows], device=self.device).cumsum(0)
        mask = self._local_mask(offsets)
        if _distributed():
            dist.all_reduce(mask, op=dist.ReduceOp.MAX)
        count = len(self.parameters)
        flags = mask[: 2 * count].view(2, count).tolist()
        touched = mask[2 * count :].nonzero().flatten()
        owner = torch.searchsorted(offsets, touched, right=True) - 1
        per_parameter = touched.split(torch.bincount(owner, minlength=count).tolist())
        layout: list[torch.Tensor | str] = []
        for i, (rows, sparse, dense) in enumerate(zip(per_parameter, *flags)):
            if dense:
                layout.append(DENSE)
            else:
                layout.append(rows - offsets[i] if sparse else ABSENT)
        return layout

    def _flat(self, objective: int, layout: list[torch.Tensor | str]) -> torch.Tensor:
        parts = []
        for i, (p, rows) in enumerate(zip(self.parameters, layout)):
            pieces = self.pieces[objective][i]
            pieces = [torch.cat(part).to(self.device) for part in zip(*pieces)] if pieces else None
            if isinstance(rows, torch.Tensor):
                summed = torch.zeros((len(rows), *p.shape[1:]), device=self.device)
                if pieces is not None:
                    summed.index_add_(0, torch.searchsorted(rows, pieces[0]), pieces[1])
                parts.append(summed.flatten())
            elif rows == DENSE:
                value = self.dense[objective][i]
                value = torch.zeros(p.shape, device=self.device) if value is None else value.to(self.device)
                parts.append((value if pieces is None else value.index_add(0, *pieces)).flatten())
        return torch.cat(parts) if parts else torch.zeros(0, device=self.device)

    def apply(self) -> Projection | None:
        """All-reduce (mean) the sums across processes, project them (several objectives), and write the update
        into ``.grad`` (row-sparse parameters get a sparse COO gradient on their touched rows). Returns the
        projection, or None with one objective."""
        layout = self._layout()
        stacked = torch.stack([self._flat(objective, layout) for objective in range(self.num_objectives)])
        if _distributed():
            dist.all_reduce(stacked)
            stacked /= dist.get_world_size()
        if self.num_objectives > 1:
            update, projection = project(stacked)
        else:
            update, projection = stacked[0], None
        offset = 0
        for p, rows in zip(self.parameters, layout):
            if isinstance(rows, torch.Tensor):
                size = len(rows) * math.prod(p.shape[1:])
                values = (
                    update[offset : offset + size].view(len(rows), *p.shape[1:]).to(device=p.device, dtype=p.dtype)
                )
                indices = rows.to(p.device).unsqueeze(0)
                p.grad = torch.sparse_coo_tensor(indices, values, p.shape, is_coalesced=True, check_invariants=False)
            elif rows == DENSE:
                size = p.numel()
                p.grad = update[offset : offset + size].view_as(p).to(device=p.device, dtype=p.dtype)
            else:
                size = 0
                p.grad = None
            offset += size
        self._reset()
        return projection


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
