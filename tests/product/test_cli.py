"""The `anystory` command line, end to end on tiny random weights loaded from folders."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from anystory import AnyStorySDXLPipeline, Subject
from anystory.cli import main
from anystory.visualize import routing_overlay
from anystory.visualize import grid_shape, layer_groups
from tests.test_dreambench_eval import SUBSET, save_tiny_models

from .conftest import SIZE

PROMPT = "on the left a red dog, on the right a blue cat"


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_matches_the_library_and_saves_the_routing_overlay(capsys, tmp_path, model_dir, references):
    out = tmp_path / "result.png"
    code, stdout, _ = run(
        capsys, "generate", PROMPT, "--subject", references["cutout"], "--subject", f"{references['photo']}:{references['mask']}",
        "--model", model_dir, "--steps", 3, *SIZE, "--seed", 5, "--subject-scale", 1.5, "--out", out, "--routing-maps",
    )
    assert code == 0 and f"image: {out}" in stdout
    image = Image.open(out)
    overlay = Image.open(tmp_path / "result_routing.png")
    assert image.size == overlay.size == (64, 64)

    pipe = AnyStorySDXLPipeline.from_base(model_dir, model_dir / "adapter", model_dir / "image_encoder")
    subjects = [Subject(references["cutout"]), Subject(references["photo"], references["mask"])]
    expected = pipe(PROMPT, subjects=subjects, num_inference_steps=3, height=64, width=64, subject_scale=1.5,
                    generator=torch.Generator().manual_seed(5), return_routing_maps=True)
    assert np.array_equal(np.asarray(image), np.asarray(expected.images[0]))
    expected_overlay = routing_overlay(expected.images[0], expected.routing_maps.mean()[-1, 0])
    assert np.array_equal(np.asarray(overlay), np.asarray(expected_overlay))


def test_generate_with_layout_and_several_images(capsys, tmp_path, model_dir, references):
    out = tmp_path / "placed.png"
    code, stdout, err = run(
        capsys, "generate", PROMPT, "--subject", references["cutout"], "--subject", references["cutout"],
        "--layout", references["left"], references["right"], "--num-images", 2, "--routing-maps",
        "--model", model_dir, "--steps", 2, *SIZE, "--out", out,
    )
    assert code == 0 and "no routing maps with --no-router or --layout" in err and stdout.count("image: ") == 2
    first, second = (np.asarray(Image.open(tmp_path / f"placed-{i}.png")) for i in (1, 2))
    assert first.shape == second.shape == (64, 64, 3) and not np.array_equal(first, second)
    assert not list(tmp_path.glob("*_routing.png"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--subject", "{missing}"], "subject file not found"),
        (["--subject", "{junk}"], "is not a readable image"),
        (["--subject", "{photo}:{small_mask}"], "does not match image size"),
        (["--subject", "{cutout}", "--layout", "{left}", "{right}"], "one mask per --subject"),
        (["--model", "{missing}"], "model not found"),
        (["--model", "{photo}", "--adapter", "{model}/adapter", "--image-encoder", "{model}/image_encoder"], "needs --base-config"),
        (["--model", "{model}", "--adapter", "{missing}"], "--adapter folder not found"),
        (["--subject", "{cutout}", "--height", "60"], "multiples of 8"),
    ],
)
def test_bad_inputs_end_with_one_clear_line(capsys, tmp_path, model_dir, references, argv, message):
    names = {**{k: str(v) for k, v in references.items()}, "missing": str(tmp_path / "nope.png"), "model": str(model_dir)}
    argv = [a.format(**names) for a in argv]
    if "--model" not in argv:
        argv += ["--model", str(model_dir)]
    code, _, err = run(capsys, "generate", PROMPT, "--steps", 1, *argv, "--out", tmp_path / "x.png")
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err
    assert lines[-1].startswith("anystory: error:") and message in lines[-1]
    assert not (tmp_path / "x.png").exists()


def test_a_real_process_exits_2_with_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "anystory.cli", "generate", PROMPT, "--subject", str(tmp_path / "gone.png"), "--model", "tiny"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == f"anystory: error: subject file not found: {tmp_path / 'gone.png'}"


def test_help_teaches_with_examples(capsys):
    for command in ("generate", "storyboard", "visualize", "segment", "evaluate", "serve"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        text = capsys.readouterr().out
        assert exit_info.value.code == 0 and "examples:" in text and f"anystory {command}" in text
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert all(c in text for c in ("generate", "storyboard", "visualize", "segment", "evaluate", "serve", "train"))


def test_storyboard_writes_frames_and_contact_sheet(capsys, tmp_path, model_dir, references):
    script = tmp_path / "story.yaml"
    script.write_text(
        f"characters:\n  - alias: Rex\n    image: {references['cutout']}\n  - alias: Tom\n    image: {references['photo']}\n"
        f"    mask: {references['mask']}\nframes:\n  - prompt: Rex on the beach\n  - prompt: Rex and Tom in the snow\n"
    )
    code, stdout, _ = run(capsys, "storyboard", script, "--out", tmp_path / "story", "--model", model_dir, "--steps", 2, *SIZE)
    assert code == 0 and "2 frames" in stdout
    frames = sorted((tmp_path / "story" / "frames").glob("*.png"))
    assert [f.name for f in frames] == ["001.png", "002.png"]
    assert Image.open(frames[0]).size == (64, 64)
    assert (tmp_path / "story" / "contact_sheet.png").is_file()


def test_storyboard_character_option_is_validated(capsys, tmp_path, references):
    script = tmp_path / "story.yaml"
    script.write_text("characters:\n  - alias: Rex\n    prompt: a dog\nframes:\n  - prompt: Rex runs\n")
    code, _, err = run(capsys, "storyboard", script, "--out", tmp_path, "--character", "Rex", "--model", "tiny")
    assert code == 2 and "ALIAS=IMAGE[:MASK]" in err
    code, _, err = run(capsys, "storyboard", script, "--out", tmp_path, "--character", f"Max={references['cutout']}", "--model", "tiny")
    assert code == 2 and "unknown character 'Max'" in err


def test_visualize_draws_the_step_by_layer_grid(capsys, tmp_path, model_dir, references):
    out = tmp_path / "maps.png"
    code, _, _ = run(
        capsys, "visualize", PROMPT, "--subject", references["cutout"], "--subject", references["cutout"],
        "--model", model_dir, "--steps", 4, *SIZE, "--rows", 3, "--cell", 40, "--out", out,
    )
    assert code == 0
    pipe = AnyStorySDXLPipeline.from_base(model_dir, model_dir / "adapter", model_dir / "image_encoder")
    assert Image.open(out).size == grid_shape(3, len(layer_groups(pipe.unet)) + 1, 40)
    assert Image.open(tmp_path / "maps_image.png").size == (64, 64)


def test_segment_writes_one_mask_per_subject(capsys, tmp_path, model_dir, references):
    out = tmp_path / "segments"
    code, stdout, _ = run(
        capsys, "segment", references["photo"], "--subject", references["cutout"], "--subject", f"{references['photo']}:{references['mask']}",
        "--model", model_dir, "--out", out, "--strength", 0.6,
    )
    assert code == 0 and stdout.count("% of the image") == 2
    masks = [np.asarray(Image.open(p)) for p in sorted(out.glob("mask_*.png"))]
    assert len(masks) == 2 and all(m.shape == (40, 48) and set(np.unique(m)) <= {0, 255} for m in masks)
    assert not np.any((masks[0] > 0) & (masks[1] > 0))
    assert Image.open(out / "overlay.png").size == (48, 40)


def test_evaluate_prints_the_table_and_saves_scores(capsys, tmp_path, model_dir):
    dino, clip = save_tiny_models(tmp_path / "metrics")
    out = tmp_path / "bench"
    code, stdout, _ = run(
        capsys, "evaluate", "--dataset", SUBSET, "--dino", dino, "--clip", clip, "--subjects", "dog", "teapot",
        "--prompts", 2, "--matting", "none", "--model", model_dir, "--steps", 1, *SIZE, "--out", out,
    )
    assert code == 0
    assert "| Method | DINO ↑ | CLIP-I ↑ | CLIP-T ↑ |" in stdout and "| AnyStory |" in stdout
    scores = json.loads((out / "scores.json").read_text())
    assert scores["samples"] == 4 and set(scores["per_subject"]) == {"dog", "teapot"}
    assert len(list(out.glob("*/*.png"))) == 4


def test_evaluate_names_a_bad_dataset(capsys, tmp_path):
    code, _, err = run(capsys, "evaluate", "--dataset", tmp_path, "--dino", tmp_path, "--clip", tmp_path, "--model", "tiny")
    assert code == 2 and "is not a DreamBench dataset folder" in err


def test_train_is_delegated_to_the_trainer(capsys, tmp_path):
    pytest.importorskip("anystory.training.cli")
    code, _, err = run(capsys, "train", "stage1", "--config", tmp_path / "missing.yaml")
    assert code == 2 and "config file not found" in err
