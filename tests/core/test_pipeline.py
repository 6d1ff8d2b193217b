import copy

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from anystory import AnyStorySDXLPipeline, SubjectError
from anystory.models import transformer_blocks

from .conftest import make_adapter, random_subject

CALL = dict(num_inference_steps=3, height=64, width=64, output_type="np", guidance_scale=7.5)


def generate(pipe, seed=0, **kwargs):
    return pipe("a red dog on the left", generator=torch.Generator().manual_seed(seed), **{**CALL, **kwargs})


def test_without_subjects_output_equals_diffusers_sdxl(components):
    expected = generate(StableDiffusionXLPipeline(**components)).images
    pipe = AnyStorySDXLPipeline(**components, adapter=make_adapter(components["unet"]))
    assert np.abs(generate(pipe).images - expected).max() <= 1e-5
    assert np.abs(generate(pipe, subjects=[]).images - expected).max() <= 1e-5


def test_user_lora_on_the_base_still_works(components):
    pytest.importorskip("peft", reason="LoRA loading needs peft (test extra)")
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    lora_unet = copy.deepcopy(components["unet"])
    lora_unet.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False))
    lora = {f"unet.{k}": v for k, v in get_peft_model_state_dict(lora_unet).items()}

    sdxl = StableDiffusionXLPipeline(**components)
    plain = generate(sdxl).images
    sdxl.load_lora_weights(dict(lora))
    expected = generate(sdxl).images
    sdxl.unload_lora_weights()
    assert np.abs(expected - plain).max() > 1e-3  # the LoRA does something

    pipe = AnyStorySDXLPipeline(**components, adapter=make_adapter(components["unet"]))
    pipe.load_lora_weights(dict(lora))
    assert np.abs(generate(pipe).images - expected).max() <= 1e-5
    with_subject = generate(pipe, subjects=[random_subject(0)]).images
    pipe.unload_lora_weights()
    assert np.abs(with_subject - generate(pipe, subjects=[random_subject(0)]).images).max() > 1e-3


@pytest.mark.parametrize("count", [1, 2, 4])
def test_subjects_generate_and_routing_maps_are_documented(pipe, subjects, count):
    pipe.adapter.register_to_config(router_trained=True)
    out = generate(pipe, subjects=subjects[:count], return_routing_maps=True, num_images_per_prompt=2)
    assert out.images.shape == (2, 64, 64, 3) and np.isfinite(out.images).all()
    maps = out.routing_maps
    assert len(maps.refined) == len(maps.coarse) == len(transformer_blocks(pipe.unet))
    assert {tuple(m.shape[:3]) for m in maps.refined} == {(CALL["num_inference_steps"], 2, count + 1)}
    soft = maps.mean()
    assert soft.shape == (3, 2, count + 1, 16, 16)
    torch.testing.assert_close(soft.sum(dim=2), torch.ones(3, 2, 16, 16))
    for layer_maps in maps.refined:
        torch.testing.assert_close(layer_maps.sum(dim=2), torch.ones_like(layer_maps[:, :, 0]))
    hard = maps.hard()
    assert set(hard.unique().tolist()) == {0.0, 1.0} and torch.all(hard.sum(dim=2) == 1)


def test_subjects_change_the_image_and_subject_scale_matters(pipe, subjects):
    plain = generate(pipe).images
    one = generate(pipe, subjects=subjects[:1]).images
    stronger = generate(pipe, subjects=subjects[:1], subject_scale=3.0).images
    assert np.abs(one - plain).max() > 1e-3 and np.abs(stronger - one).max() > 1e-3


def test_reference_shift_defaults_to_the_adapters_calibrated_value(pipe, subjects):
    zero = generate(pipe, subjects=subjects[:1], reference_shift=0.0).images
    assert np.array_equal(generate(pipe, subjects=subjects[:1]).images, zero)  # a fresh adapter: gamma 0
    pipe.adapter.register_to_config(reference_shift=2.0)
    shifted = generate(pipe, subjects=subjects[:1]).images
    assert np.array_equal(shifted, generate(pipe, subjects=subjects[:1], reference_shift=2.0).images)
    assert np.abs(shifted - zero).max() > 1e-3


def _first_noise_prediction(pipe, subjects, **kwargs) -> torch.Tensor:
    """The U-Net's output on the first step, (2, C, h, w): row 0 is the CFG unconditional branch."""
    outputs = []
    hook = pipe.unet.register_forward_hook(lambda module, args, out: outputs.append(out[0].detach().clone()))
    generate(pipe, subjects=subjects, num_inference_steps=1, **kwargs)
    hook.remove()
    return outputs[0]


@pytest.mark.parametrize("routing", ["none", "router", "layout"])
def test_without_unconditional_references_guidance_amplifies_the_subjects(pipe, subjects, routing):
    """Off: the unconditional branch holds no subject, whichever are given; on (DESIGN §1's
    default) it keeps each one's reference attention. The conditional branch is the same."""
    pipe.adapter.register_to_config(router_trained=routing == "router")
    layout = torch.zeros(2, 64, 64)
    layout[0, :, :32], layout[1, :, 32:] = 1, 1
    options = {"subject_masks": layout} if routing == "layout" else {}
    first, second = subjects[:2], subjects[2:4]
    dropped = [_first_noise_prediction(pipe, s, unconditional_references=False, **options) for s in (first, second)]
    kept = [_first_noise_prediction(pipe, s, unconditional_references=True, **options) for s in (first, second)]
    torch.testing.assert_close(dropped[0][0], dropped[1][0], rtol=0, atol=1e-6)
    assert (kept[0][0] - kept[1][0]).abs().max() > 1e-4
    torch.testing.assert_close(dropped[0][1], kept[0][1])  # the conditional rows do not change
    assert (dropped[0][1] - dropped[1][1]).abs().max() > 1e-4


def test_encodings_run_once_per_call_and_are_reusable(pipe, subjects):
    calls = {"reference_net": 0, "image_encoder": 0, "subject_k": 0, "reference_k": 0}
    pipe.adapter.reference_net.register_forward_hook(lambda *a: calls.__setitem__("reference_net", calls["reference_net"] + 1))
    pipe.image_encoder.register_forward_hook(lambda *a: calls.__setitem__("image_encoder", calls["image_encoder"] + 1))
    pipe.adapter.layers[3].subject_k.register_forward_hook(lambda *a: calls.__setitem__("subject_k", calls["subject_k"] + 1))
    pipe.adapter.layers[3].reference_k.register_forward_hook(lambda *a: calls.__setitem__("reference_k", calls["reference_k"] + 1))
    image = generate(pipe, subjects=subjects[:2], num_inference_steps=4).images
    assert calls == {"reference_net": 1, "image_encoder": 1, "subject_k": 1, "reference_k": 1}
    encodings = pipe.encode_subjects(subjects[:2])
    reused = generate(pipe, subjects=encodings, num_inference_steps=4).images
    assert np.array_equal(image, reused)
    swapped = generate(pipe, subjects=encodings.select([1, 0]), num_inference_steps=4).images
    assert not np.array_equal(image, swapped)


def test_subject_step_window_leaves_earlier_steps_untouched(components, subjects):
    def first_latents(pipe, **kwargs):
        seen = []
        def keep(p, step, t, kw):
            seen.append(kw["latents"].clone())
            return kw
        generate(pipe, callback_on_step_end=keep, **kwargs)
        return seen

    pipe = AnyStorySDXLPipeline(**components, adapter=make_adapter(components["unet"]))
    plain = first_latents(pipe)
    late = first_latents(pipe, subjects=subjects[:1], subject_steps=(0.5, 1.0))
    always = first_latents(pipe, subjects=subjects[:1])
    assert torch.equal(late[0], plain[0]) and not torch.equal(always[0], plain[0])
    assert not torch.equal(late[-1], plain[-1])


def test_layout_masks_replace_the_router(pipe, subjects):
    masks = np.zeros((2, 64, 64), dtype=np.float32)
    masks[0, :, :32], masks[1, :, 32:] = 1, 1
    left_right = generate(pipe, subjects=subjects[:2], subject_masks=masks).images
    right_left = generate(pipe, subjects=subjects[:2], subject_masks=masks[::-1].copy()).images
    assert np.abs(left_right - right_left).max() > 1e-3
    with pytest.raises(ValueError, match="one \\(H, W\\) mask per subject"):
        generate(pipe, subjects=subjects[:2], subject_masks=masks[:1])
    with pytest.raises(ValueError, match="the output is"):
        generate(pipe, subjects=subjects[:2], subject_masks=np.zeros((2, 32, 32)))


def test_bad_calls_name_the_problem(pipe, subjects):
    with pytest.raises(ValueError, match="multiples of 8"):
        generate(pipe, subjects=subjects[:1], height=60)
    pipe.adapter.register_to_config(max_subjects=3)
    with pytest.raises(SubjectError, match="at most 3"):
        generate(pipe, subjects=subjects)
    with pytest.raises(SubjectError, match="Subject objects"):
        generate(pipe, subjects=["dog.png"])
    with pytest.raises(ValueError, match="subject_steps"):
        generate(pipe, subjects=subjects[:1], subject_steps=(0.6, 0.2))


def test_nan_is_reported_not_drawn(pipe, subjects):
    with torch.no_grad():
        pipe.adapter.layers[5].subject_v.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="NaN"):
        generate(pipe, subjects=subjects[:1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_float32(components, subjects, dtype):
    pipe = AnyStorySDXLPipeline(**components, adapter=make_adapter(components["unet"]))
    reference = generate(pipe, subjects=subjects[:2]).images
    pipe.to(dtype)
    low = generate(pipe, subjects=subjects[:2]).images
    assert np.isfinite(low).all() and np.abs(low - reference).mean() < 0.05


def test_from_base_loads_local_folders(components, tmp_path, subjects):
    pipe = AnyStorySDXLPipeline(**components, adapter=make_adapter(components["unet"]))
    expected = generate(pipe, subjects=subjects[:2]).images
    pipe.adapter.save_pretrained(tmp_path / "adapter")
    pipe.image_encoder.save_pretrained(tmp_path / "clip")
    pipe.feature_extractor.save_pretrained(tmp_path / "clip")
    pipe.adapter.detach(pipe.unet)
    StableDiffusionXLPipeline(**{k: v for k, v in components.items() if k not in ("image_encoder", "feature_extractor")}).save_pretrained(tmp_path / "sdxl")
    loaded = AnyStorySDXLPipeline.from_base(tmp_path / "sdxl", tmp_path / "adapter", tmp_path / "clip")
    assert loaded.scheduler.config.use_karras_sigmas
    assert np.abs(generate(loaded, subjects=subjects[:2]).images - expected).max() <= 1e-5
    with pytest.raises(FileNotFoundError, match="not found"):
        AnyStorySDXLPipeline.from_base(tmp_path / "nothing", tmp_path / "adapter", tmp_path / "clip")


def test_a_cast_larger_than_the_per_image_limit_encodes_once(pipe, subjects):
    pipe.adapter.register_to_config(max_subjects=2)
    encodings = pipe.encode_subjects(subjects)
    assert len(encodings) == 4
    assert generate(pipe, subjects=encodings.select([3, 0])).images.shape == (1, 64, 64, 3)
    with pytest.raises(SubjectError, match="at most 2 per image"):
        generate(pipe, subjects=encodings)


def test_pipeline_folder_round_trip(pipe, subjects, tmp_path):
    expected = generate(pipe, subjects=subjects[:2]).images
    pipe.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved_unet = load_file(next((tmp_path / "unet").glob("*.safetensors")))
    assert not any(".processor." in k for k in saved_unet)  # the base U-Net is saved untouched
    loaded = AnyStorySDXLPipeline.from_pretrained(tmp_path)
    assert np.abs(generate(loaded, subjects=subjects[:2]).images - expected).max() <= 1e-5
    assert np.abs(generate(pipe, subjects=subjects[:2]).images - expected).max() == 0  # still attached


def test_model_cpu_offload_runs_the_same_generation(pipe, subjects):
    """Exercises diffusers' offload hooks (the adapter is in the offload sequence and its
    `encode` triggers them); on this CPU-only machine the 'accelerator' is the CPU itself."""
    expected = generate(pipe, subjects=subjects[:2]).images
    pipe.enable_model_cpu_offload(device="cpu")
    entered = []
    hook = pipe.adapter._hf_hook
    original = hook.pre_forward
    hook.pre_forward = lambda module, *a, **k: (entered.append(module), original(module, *a, **k))[1]
    assert np.abs(generate(pipe, subjects=subjects[:2]).images - expected).max() <= 1e-5
    assert entered and entered[0] is pipe.adapter


def test_image_processor_follows_the_encoder_and_refuses_a_mismatch(components, tmp_path):
    from transformers import CLIPImageProcessor

    from anystory.pipelines.components import load_sdxl_components

    sdxl_parts = {k: v for k, v in components.items() if k not in ("image_encoder", "feature_extractor")}
    StableDiffusionXLPipeline(**sdxl_parts).save_pretrained(tmp_path / "sdxl")
    components["image_encoder"].save_pretrained(tmp_path / "clip")  # no preprocessor_config.json
    loaded = load_sdxl_components(tmp_path / "sdxl", tmp_path / "clip")
    assert loaded["feature_extractor"].crop_size["height"] == components["image_encoder"].config.image_size
    CLIPImageProcessor().save_pretrained(tmp_path / "clip")  # CLIP's 224 px defaults
    with pytest.raises(ValueError, match="crops to 224 px but the encoder"):
        load_sdxl_components(tmp_path / "sdxl", tmp_path / "clip")
