"""Per-example routing state shared by every TKI layer of one model.

Routing is held by the tuner, not passed through the layers, because transformers does not forward
arbitrary per-example tensors to a linear layer. It is resolved once per call (top-k and blend weights
for every adapter) and read by each layer; it stays in place after the call, so activation checkpointing,
which re-runs the layers during backward, routes exactly as the forward did.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

from ..retrieval import retrieve
from .config import LatentLoraConfig


class Routing:
    """The queries and groups of one batch, and each adapter's latent tasks for them (retrieved once, on first use)."""

    def __init__(self, router: Router, query_embeddings: torch.Tensor, group_ids: torch.Tensor | None) -> None:
        self.batch_size = query_embeddings.shape[0]
        self._router = router
        self._query_embeddings = query_embeddings
        self._group_ids = group_ids
        self._selections: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def selection(self, adapter_name: str, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices and weights for ``rows`` input rows.

        ``generate`` with beam search or ``num_return_sequences`` repeats each example's row contiguously
        (``repeat_interleave``); the selection is expanded the same way.
        """
        if rows % self.batch_size:
            raise ValueError(
                f"The model received {rows} rows but was routed with {self.batch_size} query embeddings: pass one "
                "query embedding per example of the batch."
            )
        if (adapter_name, self.batch_size) not in self._selections:
            self._selections[adapter_name, self.batch_size] = self._router.retrieve(
                adapter_name, self._query_embeddings, self._group_ids
            )
        if (adapter_name, rows) not in self._selections:
            indices, weights = self._selections[adapter_name, self.batch_size]
            repeats = rows // self.batch_size
            self._selections[adapter_name, rows] = (
                indices.repeat_interleave(repeats, 0),
                weights.repeat_interleave(repeats, 0),
            )
        return self._selections[adapter_name, rows]


class Bypass:
    """Routing that leaves the bank out: latent layers add nothing, whatever the batch (inputs kept out of the
    latent tasks, e.g. flashbacks without joint latent task learning)."""

    batch_size = None

    def selection(self, adapter_name: str, rows: int) -> None:
        return None


class Router:
    """Resolves queries into latent-task selections and tells each layer which one applies now.

    Two sources, the innermost winning: routing given as keywords to a model call (kept until the next call),
    and routing set by the `tki_trainer.route` or `bypass_bank` contexts (kept until the block ends).
    """

    def __init__(self, keys: Mapping[str, torch.Tensor], configs: Mapping[str, LatentLoraConfig]) -> None:
        self._keys = keys
        self._configs = configs
        self._context: list[Routing | Bypass] = []
        self._call: Routing | None = None

    def resolve(
        self, query_embeddings: torch.Tensor, group_ids: torch.Tensor | None, adapter_names: list[str]
    ) -> Routing:
        """Validate the queries and retrieve the given (active) adapters' latent tasks, before any model work;
        other adapters retrieve on first use."""
        if (
            not isinstance(query_embeddings, torch.Tensor)
            or query_embeddings.ndim != 2
            or not query_embeddings.is_floating_point()
        ):
            raise ValueError(
                "query_embeddings must be a float tensor of shape [batch, key_dim], one sentence-encoder embedding per "
                f"example; got {type(query_embeddings).__name__} {tuple(getattr(query_embeddings, 'shape', ()))}."
            )
        batch_size = query_embeddings.shape[0]
        if group_ids is not None:
            group_ids = torch.as_tensor(group_ids)
            if group_ids.shape != (batch_size,) or group_ids.is_floating_point():
                raise ValueError(
                    f"group_ids must be an integer tensor of shape [{batch_size}] (one group per query), got "
                    f"{group_ids.dtype} {tuple(group_ids.shape)}."
                )
        routing = Routing(self, query_embeddings, group_ids)
        for adapter_name in adapter_names:
            if adapter_name in self._keys:
                routing.selection(adapter_name, batch_size)
        return routing

    def retrieve(
        self, adapter_name: str, query_embeddings: torch.Tensor, group_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k latent tasks and blend weights of one adapter's bank, after checking the inputs against it."""
        config = self._configs[adapter_name]
        keys = self._keys[adapter_name]
        finite = torch.isfinite(query_embeddings).all(dim=1)
        if not bool(finite.all()):
            rows = (~finite).nonzero().flatten().tolist()
            raise ValueError(
                f"query_embeddings rows {rows[:5]} hold NaN or inf, which would route those examples nowhere and "
                "turn the adapter's weights NaN: re-encode their prompts (tki_trainer.add_query_embeddings)."
            )
        if query_embeddings.shape[1] != config.key_dim:
            raise ValueError(
                f"query_embeddings have dimension {query_embeddings.shape[1]} but adapter {adapter_name!r} has "
                f"key_dim={config.key_dim}: encode the prompts with the encoder the adapter was built for"
                + (f" ({config.encoder_name})" if config.encoder_name else "")
                + " or build the adapter with key_dim matching your encoder."
            )
        if group_ids is not None:
            group_ids = group_ids.to(keys.device, torch.long)
            if bool(((group_ids < 0) | (group_ids >= config.num_groups)).any()):
                raise ValueError(
                    f"group_ids must lie in [0, {config.num_groups}) for adapter {adapter_name!r} "
                    f"(num_groups={config.num_groups}); got values from {int(group_ids.min())} to {int(group_ids.max())}."
                )
        return retrieve(
            query_embeddings.to(keys.device),
            keys,
            num_groups=config.num_groups,
            top_k=config.top_k,
            group_ids=group_ids,
            blend=config.blend,
            temperature=config.temperature,
            inference_retrieval=config.inference_retrieval,
        )

    @property
    def current(self) -> Routing | Bypass | None:
        if self._call is not None:
            return self._call
        return self._context[-1] if self._context else None

    def set_call(
        self, query_embeddings: torch.Tensor | None, group_ids: torch.Tensor | None, adapter_names: list[str]
    ) -> None:
        """Routing of a model call that received the keywords; a call without them clears it."""
        if query_embeddings is None and group_ids is not None:
            raise ValueError("group_ids were given without query_embeddings: pass both, or only query_embeddings.")
        self._call = None if query_embeddings is None else self.resolve(query_embeddings, group_ids, adapter_names)

    @contextmanager
    def use(
        self, query_embeddings: torch.Tensor, group_ids: torch.Tensor | None, adapter_names: list[str]
    ) -> Iterator[None]:
        self._context.append(self.resolve(query_embeddings, group_ids, adapter_names))
        try:
            yield
        finally:
            self._context.pop()

    @contextmanager
    def bypass(self) -> Iterator[None]:
        self._context.append(Bypass())
        try:
            yield
        finally:
            self._context.pop()

    def require(self) -> Routing | Bypass:
        """The routing in force, or the error that tells the caller how to give one."""
        routing = self.current
        if routing is None:
            raise ValueError(
                "The TKI latent bank is active but no query embeddings were given: call the model inside "
                "`with tki_trainer.route(model, query_embeddings=Q):` or pass `query_embeddings=Q` to the model or "
                "to `generate`."
            )
        return routing

    def selection(self, adapter_name: str, rows: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The latent tasks and weights of the routing in force; None inside `bypass`."""
        return self.require().selection(adapter_name, rows)
