"""The simplified ReferenceNet (paper Eq. 3): a U-Net copy without cross-attention.

It encodes a segmented reference image into G^l_i, the hidden states entering the
self-attention of every transformer block l >= 2, which the routed reference attention
then appends as extra keys and values. It runs once per subject (t = 0, no text), so its
outputs are cached for the whole denoising loop.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config

from .topology import transformer_blocks, unet_config_dict


class _AllStatesCaptured(Exception):
    """Raised by the last capture hook: nothing after that point is read, so stop the forward."""


class ReferenceNet(ModelMixin, ConfigMixin):
    """A U-Net with every `attn2`/`norm2` removed and a 5-channel input (latent + mask)."""

    @register_to_config
    def __init__(self, unet_config: dict):
        super().__init__()
        config = {**unet_config, "in_channels": unet_config["in_channels"] + 1}
        self.unet = UNet2DConditionModel.from_config(config)
        for block in transformer_blocks(self.unet):
            block.attn2 = None
            block.norm2 = None

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel) -> "ReferenceNet":
        """Build from a U-Net's config and copy its weights; the mask channel starts at zero.

        Works on the meta device, which gives parameter counts without memory.
        """
        with torch.device(unet.device):
            net = cls(unet_config_dict(unet))
        net.load_unet_weights(unet)
        return net if net.dtype == unet.dtype else net.to(unet.dtype)

    @torch.no_grad()
    def load_unet_weights(self, unet: UNet2DConditionModel) -> None:
        own = self.unet.state_dict()
        # A U-Net carrying PEFT LoRA layers stores its own weights under `.base_layer`.
        base_weights = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if "lora_" not in k}
        source = {k: v for k, v in base_weights.items() if k in own}
        missing = sorted(set(own) - set(source))
        if missing:
            raise ValueError(f"U-Net lacks ReferenceNet weights (topology mismatch?): {missing[:5]}")
        weight = source["conv_in.weight"]
        source["conv_in.weight"] = torch.cat([weight, torch.zeros_like(weight[:, :1])], dim=1)
        self.unet.load_state_dict(source, strict=True, assign=unet.device.type == "meta")

    @property
    def num_layers(self) -> int:
        return len(transformer_blocks(self.unet))

    def used_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters the forward reads: everything before its early stop.

        Found by running the forward once on the meta device (no compute, no memory) and
        keeping the modules that ran; the tail after the last captured self-attention
        (the last attn1, feed-forwards, up blocks, conv_out) never gets a gradient, so
        training leaves it out of the optimizer (and DDP need not look for it).
        """
        with torch.device("meta"):
            probe = ReferenceNet(self.config.unet_config)
        ran: set[str] = set()
        names = {module: name for name, module in probe.named_modules()}
        hooks = [m.register_forward_hook(lambda m, a, o: ran.add(names[m])) for m in names if not list(m.children())]
        config = probe.unet.config
        latent = torch.zeros(1, config.in_channels - 1, 8, 8, device="meta")
        with torch.no_grad():
            probe(latent, torch.zeros(1, 1, 8, 8, device="meta"), (64, 64))
        for hook in hooks:
            hook.remove()
        own = dict(self.named_modules())
        return [p for name in sorted(ran) for p in own[name].parameters(recurse=False)]

    def forward(self, latents: torch.Tensor, mask: torch.Tensor, pixel_size: tuple[int, int]) -> dict[int, torch.Tensor]:
        """Return {layer index l (0-based, l >= 1): hidden states entering attn1 of layer l}.

        latents: (N, C, h, w) scaled VAE latents of the segmented references;
        mask: (N, 1, h, w) subject masks at latent size; pixel_size: reference (H, W) in pixels,
        used as SDXL micro-conditioning (original size = target size, no crop).
        """
        sample = torch.cat([latents, mask.to(latents.dtype)], dim=1)
        blocks = transformer_blocks(self.unet)
        states: dict[int, torch.Tensor] = {}

        def capture(layer: int):
            def hook(module, args, kwargs):
                states[layer] = args[0] if args else kwargs["hidden_states"]
                if layer == len(blocks) - 1:
                    raise _AllStatesCaptured

            return hook

        handles = [
            block.attn1.register_forward_pre_hook(capture(layer), with_kwargs=True)
            for layer, block in enumerate(blocks)
            if layer >= 1
        ]
        try:
            self.unet(sample, 0, **self._empty_conditioning(sample, pixel_size))
        except _AllStatesCaptured:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return states

    def _empty_conditioning(self, sample: torch.Tensor, pixel_size: tuple[int, int]) -> dict:
        """Zero text conditioning: the reference is encoded independent of any prompt."""
        config = self.unet.config
        batch = sample.shape[0]
        kwargs = {"encoder_hidden_states": sample.new_zeros(batch, 1, config.cross_attention_dim)}
        if config.addition_embed_type == "text_time":
            text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            h, w = pixel_size
            time_ids = sample.new_tensor([h, w, 0, 0, h, w]).expand(batch, 6)
            kwargs["added_cond_kwargs"] = {"text_embeds": sample.new_zeros(batch, text_dim), "time_ids": time_ids}
        return kwargs
