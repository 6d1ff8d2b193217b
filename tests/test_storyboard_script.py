"""Storyboard scripts: both formats load to the same object, bad scripts fail clearly."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from anystory import AnyStoryAdapter, AnyStorySDXLPipeline, matting
from anystory.storyboard import Character, Frame, Storyboard, StoryboardError, contact_sheet, run_storyboard
from anystory.testing import tiny_sdxl_components

OFFICIAL = Path(__file__).parent / "fixtures" / "storyboard-scripts"


def write_script(folder: Path, data: dict, name: str = "story.yaml") -> Path:
    path = folder / name
    path.write_text(json.dumps(data) if name.endswith(".json") else yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.fixture
def story_dir(tmp_path):
    (tmp_path / "refs").mkdir()
    Image.new("RGB", (16, 16), "red").save(tmp_path / "refs" / "max.png")
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (2, 3, 12, 14))
    mask.save(tmp_path / "refs" / "max_mask.png")
    return tmp_path


def native_script(**overrides) -> dict:
    script = {
        "title": "Pier",
        "characters": [
            {"alias": "Max", "image": "refs/max.png", "mask": "refs/max_mask.png", "description": "a corgi dog"},
            {"alias": "Ada", "prompt": "an old woman in a red raincoat."},
        ],
        "frames": [
            {"prompt": "Max runs on the beach"},
            {"prompt": "Ada walks Max along the pier", "seed": 7, "narration": "They meet."},
            {"prompt": "an empty pier at night", "characters": ["Ada"]},
        ],
    }
    script.update(overrides)
    return script


@pytest.mark.parametrize("name", ["013420.json", "014933.json"])
def test_official_release_scripts_load_as_they_are(name):
    raw = json.loads((OFFICIAL / name).read_text(encoding="utf-8"))
    story = Storyboard.load(OFFICIAL / name)

    assert story.title == raw["故事梗概"]
    assert [c.alias for c in story.characters] == ["ROLE-A", "ROLE-B"]
    assert [c.name for c in story.characters] == [c["角色名"] for c in raw["角色表"]]
    assert all(c.needs_creation and c.image is None for c in story.characters)
    assert [f.index for f in story.frames] == [1, 2, 3, 4, 5]
    assert [f.narration for f in story.frames] == [s["旁白"] for s in raw["分镜头"]]
    for frame in story.frames:
        assert story.acting(frame) == ("ROLE-A", "ROLE-B")
        prompt = story.frame_prompt(frame)
        assert "ROLE-" not in prompt
        for character in raw["角色表"]:
            # as the official release does: the alias becomes the simple prompt, final period dropped
            assert character["simple_prompt"].rstrip(".") in prompt
    first = raw["角色表"][0]["simple_prompt"]
    assert story.character_prompt(story.characters[0]) == first


def test_official_script_with_unknown_act_role_names_it(tmp_path):
    raw = json.loads((OFFICIAL / "013420.json").read_text(encoding="utf-8"))
    raw["分镜头"][2]["act_roles"] = ["ROLE-A", "ROLE-C"]
    with pytest.raises(StoryboardError, match=r"frame 3 names unknown character\(s\) \['ROLE-C'\]"):
        Storyboard.load(write_script(tmp_path, raw, "x.json"))


def test_native_script_resolves_paths_and_acting_characters(story_dir):
    story = Storyboard.load(write_script(story_dir, native_script()))
    max_, ada = story.characters
    assert max_.image == (story_dir / "refs" / "max.png").resolve()
    assert max_.mask == (story_dir / "refs" / "max_mask.png").resolve()
    assert not max_.needs_creation and ada.needs_creation
    assert [story.acting(f) for f in story.frames] == [("Max",), ("Ada", "Max"), ("Ada",)]
    assert story.frame_prompt(story.frames[1]) == "an old woman in a red raincoat walks a corgi dog along the pier"
    assert [story.frame_seed(f) for f in story.frames] == [0, 7, 0]
    assert story.frames[1].narration == "They meet."
    assert [f.index for f in story.frames] == [1, 2, 3]


def test_json_native_script_is_detected(story_dir):
    story = Storyboard.load(write_script(story_dir, native_script(seed=3), "story.json"))
    assert story.title == "Pier" and story.seed == 3 and len(story.frames) == 3


def test_aliases_match_whole_words_only():
    story = Storyboard(
        characters=(Character("ROLE-A", prompt="a knight"), Character("ROLE-AB", prompt="a dragon")),
        frames=(Frame("ROLE-AB faces ROLE-A, not ROLE-ABC or XROLE-A"),),
    )
    assert story.acting(story.frames[0]) == ("ROLE-AB", "ROLE-A")
    assert story.frame_prompt(story.frames[0]) == "a dragon faces a knight, not ROLE-ABC or XROLE-A"


def test_image_character_without_description_keeps_its_alias(story_dir):
    story = Storyboard((Character("Max", image=story_dir / "refs" / "max.png"),), (Frame("Max sleeps"),))
    assert story.frame_prompt(story.frames[0]) == "Max sleeps"


def test_frames_without_index_are_numbered_by_position():
    story = Storyboard((), (Frame("a beach"), Frame("a pier", index=7), Frame("a boat")))
    assert [f.index for f in story.frames] == [1, 7, 3]
    with pytest.raises(StoryboardError, match=r"duplicate frame index: \[1\]"):
        Storyboard((), (Frame("a beach"), Frame("a pier", index=1)))


@pytest.mark.parametrize(
    "style, expected",
    [
        ("watercolor painting of {}, soft light", "watercolor painting of a corgi dog runs, soft light"),
        ("comic book style", "a corgi dog runs, comic book style"),
    ],
)
def test_style_is_a_template_or_a_suffix(story_dir, style, expected):
    story = Storyboard(
        (Character("Max", image=story_dir / "refs" / "max.png", description="a corgi dog"),),
        (Frame("Max runs"),),
        style=style,
    )
    assert story.frame_prompt(story.frames[0]) == expected


def test_style_also_applies_to_character_creation():
    story = Storyboard((Character("Ada", prompt="an old woman"),), (Frame("Ada sits"),), style="anime art of {}")
    assert story.character_prompt(story.characters[0]) == "anime art of an old woman"


def test_with_references_replaces_creation_keeping_the_description(story_dir):
    story = Storyboard.load(OFFICIAL / "014933.json")
    image = story_dir / "refs" / "max.png"
    given = story.with_references({"ROLE-A": (image, None)})
    role_a, role_b = given.characters
    assert role_a.image == image and not role_a.needs_creation and role_b.needs_creation
    assert given.frame_prompt(given.frames[0]) == story.frame_prompt(story.frames[0])
    with pytest.raises(StoryboardError, match="unknown character 'ROLE-Z'"):
        story.with_references({"ROLE-Z": (image, None)})


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s["frames"][0].update(characters=["Bob"]), r"frame 1 names unknown character\(s\) \['Bob'\]"),
        (lambda s: s["characters"][0].update(image="refs/missing.png"), "character 'Max': image file not found: .*missing.png"),
        (lambda s: s["characters"][0].update(mask="nope.png"), "character 'Max': mask file not found"),
        (lambda s: s["characters"][1].update(alias="Max"), "duplicate character alias: Max"),
        (lambda s: s.update(frames=[]), "the storyboard has no frames"),
        (lambda s: s.pop("frames"), "the script has no frames"),
        (lambda s: s["frames"][0].update(promt="typo"), r"frame #1: unknown key\(s\) \['promt'\]"),
        (lambda s: s["characters"][1].update(image="refs/max.png"), "'Ada' needs either an `image` or a `prompt`.*not both"),
        (lambda s: s["characters"][1].pop("prompt"), "'Ada' needs either an `image` or a `prompt`"),
        (lambda s: s["characters"][1].update(mask="refs/max_mask.png"), "'Ada' has a `mask` but no `image`"),
        (lambda s: s["frames"][1].update(seed="seven"), "frame 2: seed must be an integer"),
        (lambda s: s["frames"][2].update(prompt="  "), "frame 3: `prompt` must be a non-empty string"),
    ],
)
def test_bad_scripts_fail_with_a_message_naming_the_problem(story_dir, change, message):
    script = native_script()
    change(script)
    path = write_script(story_dir, script)
    with pytest.raises(StoryboardError, match=message) as error:
        Storyboard.load(path)
    assert str(path) in str(error.value)


def test_unparsable_and_unreadable_scripts(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("frames: [unclosed", encoding="utf-8")
    with pytest.raises(StoryboardError, match="is not valid YAML"):
        Storyboard.load(bad)
    with pytest.raises(StoryboardError, match="cannot read storyboard script"):
        Storyboard.load(tmp_path / "absent.yaml")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string", encoding="utf-8")
    with pytest.raises(StoryboardError, match="the script must be a mapping"):
        Storyboard.load(scalar)


def test_contact_sheet_places_every_image_with_its_caption():
    colours = ["red", "lime", "blue", "yellow", "magenta"]
    images = [Image.new("RGB", (40, 30), c) for c in colours]
    sheet = contact_sheet(images, [f"frame {i}" for i in range(5)], columns=3, padding=8, min_tile=0)

    assert sheet.width == 3 * (40 + 8) + 8
    cell_h = (sheet.height - 8) // 2
    for i, colour in enumerate(colours):
        x0, y0 = 8 + (i % 3) * 48, 8 + (i // 3) * cell_h
        assert sheet.getpixel((x0 + 20, y0 + 15)) == Image.new("RGB", (1, 1), colour).getpixel((0, 0))
        caption = sheet.crop((x0, y0 + 30, x0 + 40, y0 + cell_h - 8)).convert("L")
        assert caption.getextrema()[0] < 128  # some dark text under each tile
    assert sheet.getpixel((8 + 2 * 48 + 20, 8 + cell_h + 15)) == (255, 255, 255)  # empty sixth cell


def test_contact_sheet_enlarges_small_renders_with_sharp_pixels():
    image = Image.new("RGB", (64, 64), "gray")
    image.putpixel((0, 0), (255, 0, 0))
    sheet = contact_sheet([image], ["tiny"], padding=8, min_tile=256)
    assert sheet.width == 256 + 2 * 8
    assert sheet.getpixel((8 + 3, 8 + 3)) == (255, 0, 0) and sheet.getpixel((8 + 4, 8 + 4)) == (128, 128, 128)


def test_contact_sheet_wraps_long_captions_and_checks_lengths():
    image = Image.new("RGB", (64, 64), "gray")
    short = contact_sheet([image], ["short"])
    long = contact_sheet([image], ["a long caption that needs several lines " * 5], max_caption_lines=3)
    assert long.width == short.width and long.height > short.height
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        contact_sheet([image, image], ["one"])


# --- running a story with a tiny random pipeline ---------------------------------------

TINY_ADAPTER = dict(
    image_embed_dim=24, num_subject_tokens=4, qformer_dim=32, qformer_heads=4,
    routing_dim=32, router_dim=16, router_heads=2, reference_size=32,
)


@pytest.fixture(scope="module")
def tiny_pipe():
    components = tiny_sdxl_components(seed=0)
    torch.manual_seed(1)
    adapter = AnyStoryAdapter.from_unet(components["unet"], **TINY_ADAPTER)
    with torch.no_grad():  # a fresh adapter mirrors the U-Net; perturb it as training would
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return AnyStorySDXLPipeline(**components, adapter=adapter)


class SpyPipe:
    """Records what the story asks of the pipeline: encodings and generation calls."""

    def __init__(self, pipe):
        self.pipe, self.encoded, self.calls = pipe, [], []

    def encode_subjects(self, subjects):
        self.encoded.append([s.name for s in subjects])
        return self.pipe.encode_subjects(subjects)

    def __call__(self, prompt, subjects=None, generator=None, **kwargs):
        seeds = [g.initial_seed() for g in (generator if isinstance(generator, list) else [generator])]
        self.calls.append((prompt, None if subjects is None else subjects.names, seeds))
        return self.pipe(prompt=prompt, subjects=subjects, generator=generator, **kwargs)


def centre_box(image):
    mask = np.zeros((image.height, image.width), dtype=bool)
    mask[image.height // 4: 3 * image.height // 4, image.width // 4: 3 * image.width // 4] = True
    return mask


@pytest.fixture
def box_matting(monkeypatch):
    monkeypatch.setattr(matting, "_BACKENDS", {})
    matting.register_matting_backend("box", centre_box)


def test_story_encodes_each_character_once_and_gives_each_frame_its_cast(story_dir, tiny_pipe, box_matting):
    story = Storyboard.load(write_script(story_dir, native_script()))
    rows = []
    hook = tiny_pipe.image_encoder.register_forward_hook(lambda m, args, kwargs_out: rows.append(args[0].shape[0]))
    spy = SpyPipe(tiny_pipe)
    try:
        result = run_storyboard(spy, story, story_dir / "out", num_inference_steps=2, progress=False)
    finally:
        hook.remove()

    assert spy.encoded == [["Max", "Ada"]]
    assert rows == [3]  # one CLIP pass for the whole story: two characters and the null image
    creation, *frames = spy.calls
    assert creation == ("an old woman in a red raincoat.", None, [0])
    assert frames == [
        (["a corgi dog runs on the beach"], ["Max"], [0]),
        (["an old woman in a red raincoat walks a corgi dog along the pier"], ["Ada", "Max"], [7]),
        (["an empty pier at night"], ["Ada"], [0]),
    ]
    out = story_dir / "out"
    assert sorted(p.name for p in (out / "frames").iterdir()) == ["001.png", "002.png", "003.png"]
    assert Image.open(out / "contact_sheet.png").size == result.contact_sheet.size
    [cutout] = list((out / "characters").iterdir())
    assert cutout.name.startswith("Ada-") and Image.open(cutout).mode == "RGBA"
    ada = result.characters["Ada"]
    assert np.array_equal(ada.mask, centre_box(ada.image))  # the matte of the created image
    assert result.characters["Max"].mask.sum() == 10 * 11  # Max's given mask, not a matte
    assert set(result.frames) == {1, 2, 3} and result.frames[2].size == ada.image.size


def test_rerun_reuses_created_characters_until_their_prompt_changes(story_dir, tiny_pipe, box_matting):
    script = native_script(frames=[{"prompt": "Ada sits"}])
    story = Storyboard.load(write_script(story_dir, script))
    first, second = SpyPipe(tiny_pipe), SpyPipe(tiny_pipe)
    a = run_storyboard(first, story, story_dir / "out", num_inference_steps=2, progress=False)
    b = run_storyboard(second, story, story_dir / "out", num_inference_steps=2, progress=False)
    assert len(first.calls) == 2 and len(second.calls) == 1  # no second creation of Ada
    assert np.array_equal(np.asarray(a.frames[1]), np.asarray(b.frames[1]))
    script["characters"][1]["prompt"] = "a young boy"
    third = SpyPipe(tiny_pipe)
    run_storyboard(third, Storyboard.load(write_script(story_dir, script)), story_dir / "out",
                   num_inference_steps=2, progress=False)
    assert third.calls[0][0] == "a young boy" and len(third.calls) == 2


def test_batched_frames_equal_frames_made_one_by_one(story_dir, tiny_pipe):
    max_ = Character("Max", image=story_dir / "refs" / "max.png", mask=story_dir / "refs" / "max_mask.png")
    story = Storyboard((max_,), tuple(Frame(f"Max {word}", seed=seed) for word, seed in (("sits", 1), ("runs", 2), ("naps", 3))))
    single, batched = SpyPipe(tiny_pipe), SpyPipe(tiny_pipe)
    one = run_storyboard(single, story, story_dir / "one", num_inference_steps=2, progress=False)
    many = run_storyboard(batched, story, story_dir / "many", num_inference_steps=2, batch_size=3, progress=False)
    assert len(single.calls) == 3 and len(batched.calls) == 1
    assert batched.calls[0][2] == [1, 2, 3]
    for index in (1, 2, 3):
        difference = np.abs(np.asarray(one.frames[index], dtype=int) - np.asarray(many.frames[index], dtype=int))
        assert difference.max() <= 2
    assert not np.array_equal(np.asarray(one.frames[1]), np.asarray(one.frames[2]))  # seeds matter


def test_official_script_runs_as_it_is(tmp_path, tiny_pipe, box_matting):
    story = Storyboard.load(OFFICIAL / "013420.json")
    spy = SpyPipe(tiny_pipe)
    result = run_storyboard(spy, story, tmp_path, num_inference_steps=1, batch_size=5, progress=False)
    assert [c[1] for c in spy.calls] == [None, None, ["ROLE-A", "ROLE-B"]]  # two creations, one batch
    assert sorted(result.frames) == [1, 2, 3, 4, 5]
    assert (tmp_path / "contact_sheet.png").is_file()
