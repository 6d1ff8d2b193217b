"""The subject conditions that flow from the subject encoders into the routed attention.

`SubjectEncodings` is what encoding the references produces (once per call, or once per
story). `AnyStoryState` is what one U-Net forward consumes: the encodings laid out per
batch row, plus what the routed attention writes while the forward runs (the hard
routes of each layer, routing losses, recorded maps). It travels to the attention
processors as `cross_attention_kwargs={"anystory": state}`, diffusers' own channel.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F


@dataclass
class SubjectEncodings:
    """Encoded references: reused for every denoising step, CFG branch and storyboard frame."""

    subject_tokens: torch.Tensor  # (N, T, C): E_1..E_N, CLIP branch (Eq. 2)
    null_tokens: torch.Tensor  # (1, T, C): E_{N+1}, from an all-zero image
    routing_features: torch.Tensor  # (N, Dr): R_1..R_N
    background_routing: torch.Tensor  # (1, Dr): R_{N+1}
    reference_states: dict[int, torch.Tensor]  # layer -> (N, S, d): G^l_i (Eq. 3)
    names: list[str] = field(default_factory=list)

    @property
    def num_subjects(self) -> int:
        return self.subject_tokens.shape[0]

    def __len__(self) -> int:
        return self.num_subjects

    def select(self, indices: list[int]) -> "SubjectEncodings":
        """The encodings of a subset of subjects, in the given order (a storyboard frame's cast)."""
        if any(not 0 <= i < self.num_subjects for i in indices):
            raise IndexError(f"subject indices {indices} out of range for {self.num_subjects} subjects")
        index = torch.tensor(indices, dtype=torch.long, device=self.subject_tokens.device)
        return replace(
            self,
            subject_tokens=self.subject_tokens[index],
            routing_features=self.routing_features[index],
            reference_states={l: g[index] for l, g in self.reference_states.items()},
            names=[self.names[i] for i in indices] if self.names else [],
        )

    def to(self, device=None, dtype=None) -> "SubjectEncodings":
        move = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        return replace(
            self,
            subject_tokens=move(self.subject_tokens),
            null_tokens=move(self.null_tokens),
            routing_features=move(self.routing_features),
            background_routing=move(self.background_routing),
            reference_states={l: move(g) for l, g in self.reference_states.items()},
        )


@dataclass
class RecordedMaps:
    """Soft routing maps of one layer, (B, N+1, h, w) each, as the router produced them."""

    coarse: torch.Tensor
    refined: torch.Tensor


@dataclass
class AnyStoryState:
    """Subject conditions for one U-Net forward; row b of every tensor serves batch row b.

    Index N of the N + 1 entries is the background. Reference states may have batch 1
    (shared by all rows).
    """

    subject_tokens: torch.Tensor  # (B, N+1, T, C)
    reference_states: dict[int, torch.Tensor]  # layer -> (B or 1, N, S, d)
    latent_size: tuple[int, int]
    routing_features: torch.Tensor | None = None  # (B, N+1, Dr); None: no router
    subject_valid: torch.Tensor | None = None  # (B, N) bool; False marks padding
    layout_masks: torch.Tensor | None = None  # (B, N, H, W): user layout, replaces the router
    target_masks: torch.Tensor | None = None  # (B, N, H, W): ground truth for L_route
    subject_scale: float = 1.0  # eta (Eq. 5)
    reference_shift: float = 0.0  # gamma (Eq. 8)
    gumbel_tau: float | None = None  # straight-through Gumbel-softmax routing (training)
    unconditional_rows: int = 0  # the first rows are the CFG unconditional branch
    active: bool = True  # False: the U-Net runs as if no subject were given
    record_maps: bool = False
    cache_projections: bool = False  # reuse projected subject keys/values across forwards
    routes: dict[int, tuple[torch.Tensor | None, tuple[int, int]]] = field(default_factory=dict)
    routing_errors: list[torch.Tensor] = field(default_factory=list)  # per layer, see `routing_errors`
    coarse_routing_errors: list[torch.Tensor] = field(default_factory=list)
    recorded: dict[int, RecordedMaps] = field(default_factory=dict)
    projections: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def num_subjects(self) -> int:
        return self.subject_tokens.shape[1] - 1

    @classmethod
    def from_encodings(
        cls,
        encodings: SubjectEncodings,
        batch_size: int,
        latent_size: tuple[int, int],
        unconditional_rows: int = 0,
        use_router: bool = True,
        unconditional_references: bool = True,
        **options,
    ) -> "AnyStoryState":
        """Lay encodings out for a batch whose first `unconditional_rows` rows are the CFG
        unconditional branch: those get the null embedding for every subject (DESIGN §1)
        and keep the reference attention and routing, unless `unconditional_references`
        is off: then they hold no subject at all (marked invalid), so that guidance
        amplifies the references as well, as IP-Adapter's zero image embedding does."""
        n = encodings.num_subjects
        if not unconditional_references and unconditional_rows:
            valid = torch.ones(batch_size, n, dtype=torch.bool, device=encodings.subject_tokens.device)
            options["subject_valid"] = valid.index_fill(0, torch.arange(unconditional_rows, device=valid.device), False)
        cond = torch.cat([encodings.subject_tokens, encodings.null_tokens])
        uncond = encodings.null_tokens.expand(n + 1, -1, -1)
        rows = [uncond] * unconditional_rows + [cond] * (batch_size - unconditional_rows)
        routing = torch.cat([encodings.routing_features, encodings.background_routing])
        return cls(
            subject_tokens=torch.stack(rows),
            reference_states={l: g[None] for l, g in encodings.reference_states.items()},
            latent_size=latent_size,
            routing_features=routing.expand(batch_size, -1, -1) if use_router else None,
            unconditional_rows=unconditional_rows,
            **options,
        )

    def entry_valid(self) -> torch.Tensor | None:
        """(B, N+1) bool over subjects and background (the background is always valid)."""
        if self.subject_valid is None:
            return None
        background = self.subject_valid.new_ones(self.subject_valid.shape[0], 1)
        return torch.cat([self.subject_valid, background], dim=1)

    def projected(self, key: tuple[str, int], project) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of a condition, computed once per call when caching is on."""
        if not self.cache_projections:
            return project()
        if key not in self.projections:
            self.projections[key] = project()
        return self.projections[key]

    def previous_route(self, layer: int, grid: tuple[int, int]) -> torch.Tensor | None:
        """Route index per position, (B, h*w) in [0, N], from layer l-1's hard map (Eq. 8),
        resampled (nearest) to this layer's grid; None when subjects act everywhere."""
        if layer - 1 not in self.routes:
            raise RuntimeError(f"layer {layer} needs the route of layer {layer - 1}, which has not run")
        sigma, previous_grid = self.routes[layer - 1]
        if sigma is None:
            return None
        maps = sigma.unflatten(-1, previous_grid)
        if previous_grid != grid:
            maps = F.interpolate(maps, size=grid, mode="nearest")
        return maps.flatten(2).argmax(dim=1)
