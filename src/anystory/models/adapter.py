"""`AnyStoryAdapter`: every trainable AnyStory part in one diffusers model.

- `subject_qformer` and `reference_net`: the subject encoder (stage 1), with the new
  per-layer key/value projections W_hat (Eq. 5) and W_tilde (Eqs. 6-8);
- `routing_qformer` and the per-layer `router`s: the router (stage 2).

The base U-Net is never modified: `attach` installs routed attention processors that
hold the per-layer parts, `detach` restores the processors it found.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import ConfigMixin, ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from diffusers.utils.accelerate_utils import apply_forward_hook
from torch import nn

from ..utils.weight_files import tensor_shapes, weight_files
from .conditioning import SubjectEncodings
from .qformer import QFormer
from .reference_net import ReferenceNet
from .routed_attention import RoutedCrossAttnProcessor, RoutedReferenceAttnProcessor
from .router import RouterLayer
from .topology import transformer_blocks, unet_config_dict

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


class AdapterWeightsError(ValueError):
    """Adapter weights that do not match the adapter's configuration."""


class AnyStoryLayer(nn.Module):
    """The additions to one transformer block: W_hat (subject CLIP K/V), W_tilde (reference
    K/V; none on layer 1, which has no preceding route), optionally a reference query
    (see `AnyStoryAdapter`'s `reference_query`) and the router layer."""

    def __init__(
        self, dim: int, heads: int, cross_attention_dim: int, routing_dim: int,
        router_dim: int, router_heads: int, reference: bool, reference_query: bool = False,
        router_context: int = 0,
    ):
        super().__init__()
        self.heads = heads
        self.subject_k = nn.Linear(cross_attention_dim, dim, bias=False)
        self.subject_v = nn.Linear(cross_attention_dim, dim, bias=False)
        self.reference_k = nn.Linear(dim, dim, bias=False) if reference else None
        self.reference_v = nn.Linear(dim, dim, bias=False) if reference else None
        self.reference_q = nn.Linear(dim, dim, bias=False) if reference and reference_query else None
        self.router = RouterLayer(routing_dim, dim, router_dim, router_heads, router_context)

    @torch.no_grad()
    def init_from_block(self, block: nn.Module) -> None:
        """Start the new projections from the block's own (as IP-Adapter does)."""
        self.subject_k.weight.copy_(block.attn2.to_k.weight)
        self.subject_v.weight.copy_(block.attn2.to_v.weight)
        if self.reference_k is not None:
            self.reference_k.weight.copy_(block.attn1.to_k.weight)
            self.reference_v.weight.copy_(block.attn1.to_v.weight)
        if self.reference_q is not None:
            self.reference_q.weight.copy_(block.attn1.to_q.weight)


class AnyStoryAdapter(ModelMixin, ConfigMixin):
    """All trainable AnyStory parts for one U-Net topology."""

    @register_to_config
    def __init__(
        self,
        unet_config: dict,
        image_embed_dim: int = 1280,
        num_subject_tokens: int = 64,
        qformer_dim: int = 1024,
        qformer_depth: int = 4,
        qformer_heads: int = 16,
        routing_dim: int = 1024,
        router_dim: int = 256,
        router_heads: int = 4,
        reference_size: int = 512,
        max_subjects: int = 8,
        router_trained: bool = False,
        use_reference_net: bool = True,
        routing_from_reference: bool = False,
        reference_query: bool = False,
        router_context: int = 0,
        reference_shift: float = 0.0,
        unconditional_references: bool = True,
    ):
        """`reference_shift` and `unconditional_references`: the pipeline's defaults for
        gamma (Eq. 8) and for what the CFG unconditional branch keeps (DESIGN §1: the
        references, on), sampling settings calibrated once per trained adapter."""
        super().__init__()
        reference_options = {"routing_from_reference": routing_from_reference, "reference_query": reference_query}
        for option, on in reference_options.items():
            if on and not use_reference_net:
                raise ValueError(f"{option} needs the ReferenceNet (use_reference_net=True)")
        cross_dim = unet_config["cross_attention_dim"]
        self.subject_qformer = QFormer(
            image_embed_dim, cross_dim, num_subject_tokens, qformer_dim, qformer_depth, qformer_heads
        )
        self.routing_qformer = QFormer(image_embed_dim, routing_dim, 1, qformer_dim, qformer_depth, qformer_heads)
        # Without it (the paper's CLIP-only ablation) no reference attention is added.
        self.reference_net = ReferenceNet(unet_config) if use_reference_net else None
        shapes = _self_attention_shapes(unet_config)
        # Deviation, off by default (reference_query): the paper scores reference keys with
        # the frozen U-Net's own query Q. Copying a detail needs the query at a target
        # position to find the same place on the reference, which a frozen Q may not
        # encode; this adds a trainable Q~ (from `to_q`, trained in stage 1) used on the
        # reference keys only, in the same softmax (`reference_attention`).
        # Deviation, off by default (router_context > 0): that many 3 x 3 convolutions let
        # each router read Z^l's neighbourhood, not one position (`router.LatentContext`).
        self.layers = nn.ModuleList(
            AnyStoryLayer(
                dim, heads, cross_dim, routing_dim, router_dim, router_heads,
                reference=use_reference_net and layer > 0, reference_query=reference_query,
                router_context=router_context,
            )
            for layer, (dim, heads) in enumerate(shapes)
        )
        # Deviation, off by default: the paper's routing QFormer reads CLIP tokens only. Two
        # subjects that differ only below CLIP's resolution (twins) then get the same routing
        # feature and the router cannot tell them apart; this lets the routing QFormer also
        # read the ReferenceNet's finest-layer states (trained with the router, stage 2).
        self.reference_routing = nn.Linear(shapes[-1][0], image_embed_dim) if routing_from_reference else None

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, **config) -> "AnyStoryAdapter":
        """A fresh adapter for `unet`: ReferenceNet and projections start from its weights."""
        with torch.device(unet.device):
            adapter = cls(unet_config=unet_config_dict(unet), **config)
        if adapter.reference_net is not None:
            adapter.reference_net.load_unet_weights(unet)
        for layer, block in zip(adapter.layers, transformer_blocks(unet)):
            layer.init_from_block(block)
        return adapter if adapter.dtype == unet.dtype else adapter.to(unet.dtype)

    def with_router_context(self, layers: int) -> "AnyStoryAdapter":
        """A copy with `layers` router-context convolutions added (`router.LatentContext`),
        to be trained on top of this adapter's router; their last one starts at zero, so
        the copy routes exactly as this adapter until trained."""
        if self.config.router_context:
            raise ValueError(f"this adapter already has router context (router_context={self.config.router_context})")
        config = {k: v for k, v in self.config.items() if not k.startswith("_")}
        with torch.device(self.device):
            grown = type(self)(**{**config, "router_context": layers}).to(self.dtype)
        grown.load_state_dict(self.state_dict(), strict=False)  # every key but the new convolutions
        return grown

    # -- the parameter groups of the two training stages --------------------------------

    def subject_encoder_parameters(self) -> list[nn.Parameter]:
        """Stage 1: subject QFormer, ReferenceNet (the part its forward reads), W_hat and W_tilde."""
        params = list(self.subject_qformer.parameters())
        if self.reference_net is not None:
            params += self.reference_net.used_parameters()
        for layer in self.layers:
            for proj in (layer.subject_k, layer.subject_v, layer.reference_k, layer.reference_v, layer.reference_q):
                if proj is not None:
                    params += list(proj.parameters())
        return params

    def router_parameters(self) -> list[nn.Parameter]:
        """Stage 2: routing QFormer and every router layer."""
        extra = [] if self.reference_routing is None else list(self.reference_routing.parameters())
        return [
            *self.routing_qformer.parameters(), *extra,
            *(p for layer in self.layers for p in layer.router.parameters()),
        ]

    def router_context_parameters(self) -> list[nn.Parameter]:
        """Stage 2 on a trained router: the `router_context` convolutions alone. Single-subject
        routing never uses them, so it stays exactly the trained router's."""
        if not self.config.router_context:
            raise ValueError("this adapter has no router context (router_context=0) to train")
        return [p for layer in self.layers for p in layer.router.latent_context.parameters()]

    # -- attaching to a U-Net ----------------------------------------------------------------

    def attach(self, unet: UNet2DConditionModel) -> None:
        """Install the routed processors on `unet` (its own weights stay untouched).

        The processors hold this adapter's per-layer modules, so they move with the U-Net
        (`.to`, CPU offload). Freeze the U-Net before attaching if you train.
        """
        blocks = transformer_blocks(unet)
        self._check_topology(blocks)
        for layer, (block, parts) in enumerate(zip(blocks, self.layers)):
            if isinstance(block.attn1.processor, RoutedReferenceAttnProcessor):
                raise RuntimeError("an AnyStory adapter is already attached to this U-Net; detach it first")
            block.attn1.set_processor(RoutedReferenceAttnProcessor(layer, parts, block.attn1.processor))
            block.attn2.set_processor(RoutedCrossAttnProcessor(layer, parts, block.attn2.processor))

    @staticmethod
    def detach(unet: UNet2DConditionModel) -> None:
        """Restore the processors that `attach` replaced."""
        for block in transformer_blocks(unet):
            for attn in (block.attn1, block.attn2):
                if isinstance(attn.processor, (RoutedReferenceAttnProcessor, RoutedCrossAttnProcessor)):
                    attn.set_processor(attn.processor.original)

    def _check_topology(self, blocks: list) -> None:
        dims = [block.attn1.query_dim for block in blocks]
        expected = [layer.subject_k.out_features for layer in self.layers]
        if dims != expected:
            raise ValueError(
                f"adapter was built for a U-Net with {len(expected)} transformer blocks of widths "
                f"{sorted(set(expected))}, this U-Net has {len(dims)} of widths {sorted(set(dims))}"
            )
        cross = {block.attn2.to_k.in_features for block in blocks}
        if cross != {self.config.unet_config["cross_attention_dim"]}:
            raise ValueError(f"adapter expects text width {self.config.unet_config['cross_attention_dim']}, U-Net has {cross}")

    # -- encoding subjects --------------------------------------------------------------------

    @apply_forward_hook  # lets diffusers' model CPU offload bring the adapter in for encoding
    def encode(
        self,
        clip_states: torch.Tensor,
        reference_latents: torch.Tensor,
        reference_masks: torch.Tensor,
        pixel_size: tuple[int, int],
        names: list[str] | None = None,
    ) -> SubjectEncodings:
        """Encode N subjects. clip_states: (N+1, T, image_embed_dim) penultimate CLIP states,
        the last row from the all-zero image; reference_latents: (N, C, h, w) and
        reference_masks: (N, 1, h, w), unused (may be None) without a ReferenceNet."""
        tokens = self.subject_qformer(clip_states)
        states = {} if self.reference_net is None else self.reference_net(reference_latents, reference_masks, pixel_size)
        routing = self.routing_qformer(self._routing_tokens(clip_states, states))[:, 0]
        return SubjectEncodings(
            subject_tokens=tokens[:-1],
            null_tokens=tokens[-1:],
            routing_features=routing[:-1],
            background_routing=routing[-1:],
            reference_states=states,
            names=list(names or []),
        )

    def _routing_tokens(self, clip_states: torch.Tensor, reference_states: dict[int, torch.Tensor]) -> torch.Tensor:
        """What the routing QFormer reads: CLIP tokens, plus (routing_from_reference) the
        projected finest ReferenceNet states; the null image's row gets zeros there."""
        if self.reference_routing is None:
            return clip_states
        detail = self.reference_routing(reference_states[max(reference_states)])
        detail = torch.cat([detail, detail.new_zeros(1, *detail.shape[1:])])
        return torch.cat([clip_states, detail.to(clip_states.dtype)], dim=1)

    # -- loading with clear errors --------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args, allow_pickle: bool = False, **kwargs):
        """Load from a local folder of safetensors weights; mismatched weights raise
        `AdapterWeightsError` naming the keys. Pickle checkpoints need `allow_pickle=True`."""
        folder = Path(pretrained_model_name_or_path)
        subfolder = kwargs.get("subfolder")
        if subfolder:
            folder = folder / subfolder
        safetensors = [folder / WEIGHTS_NAME, folder / f"{WEIGHTS_NAME}.index.json"]  # single file or shards
        if folder.is_dir() and not any(path.exists() for path in safetensors):
            if any(folder.glob("*.bin")) and not allow_pickle:
                raise AdapterWeightsError(
                    f"{folder} holds only pickle weights (.bin); they can run arbitrary code when "
                    "loaded. Convert them to safetensors or pass allow_pickle=True if you trust them."
                )
            if not any(folder.glob("*.bin")):
                raise AdapterWeightsError(f"no adapter weights ({WEIGHTS_NAME} or its shard index) in {folder}")
        if any(path.exists() for path in safetensors):
            _check_weights(folder)
            kwargs.setdefault("use_safetensors", True)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


def _self_attention_shapes(unet_config: dict) -> list[tuple[int, int]]:
    """(width, heads) of each transformer block's self-attention, read off a meta-device U-Net."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    return [(block.attn1.query_dim, block.attn1.heads) for block in transformer_blocks(unet)]


def _check_weights(folder: Path) -> None:
    """Compare the weights' keys and shapes (one file or its shards) with what the config
    builds (on the meta device)."""
    config = json.loads((folder / "config.json").read_text())
    init = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in AnyStoryAdapter(**init).state_dict().items()}
    try:
        found = tensor_shapes(weight_files(folder, WEIGHTS_NAME))
    except FileNotFoundError as error:
        raise AdapterWeightsError(f"adapter weights incomplete: {error}") from error
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[:3]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    if mismatched:
        k = mismatched[0]
        problems.append(f"{len(mismatched)} with the wrong shape (e.g. {k}: file {found[k]}, expected {expected[k]})")
    if problems:
        raise AdapterWeightsError(f"adapter weights in {folder} do not match its config: " + "; ".join(problems))
