"""DreamBench evaluation: the real layout parses exactly, metrics give known answers.

The metric models are tiny random ViT / CLIP models saved to a temporary folder and
loaded by path, as real ones would be.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

from anystory.evaluation import (
    BenchScores,
    DreamBench,
    DreamBenchError,
    MetricModelError,
    MetricModels,
    PromptsAndClasses,
    evaluate,
    fill_prompt,
    format_table,
    load_groups,
)
from anystory.utils.tokenizer import build_word_tokenizer

SUBSET = Path(__file__).parent / "fixtures" / "dreambench-subset"
WORDS = ["a", "an", "and", "the", "dog", "teapot", "vase", "cartoon", "in", "jungle", "snow", "red", "hat", "wearing", "on", "beach"]


def pickle_weights(folder: Path) -> None:
    """Rewrite a saved model's weights as a pickle checkpoint (`pytorch_model.bin`)."""
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def save_tiny_models(folder: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    dino = ViTModel(
        ViTConfig(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=1,
                  num_attention_heads=2, intermediate_size=37)
    )
    dino.save_pretrained(folder / "dino")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder / "dino")
    tokenizer = build_word_tokenizer(WORDS)
    clip = CLIPModel(
        CLIPConfig(
            text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37,
                             num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                             bos_token_id=0, eos_token_id=1, pad_token_id=1),
            vision_config=dict(image_size=32, patch_size=16, hidden_size=32, intermediate_size=37,
                               num_hidden_layers=1, num_attention_heads=2),
            projection_dim=16,
        )
    )
    clip.save_pretrained(folder / "clip")
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(folder / "clip")
    return folder / "dino", folder / "clip"


@pytest.fixture(scope="module")
def model_paths(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("metric-models"))


@pytest.fixture(scope="module")
def metrics(model_paths):
    return MetricModels.from_pretrained(*model_paths)


@pytest.fixture(scope="module")
def bench():
    return DreamBench.load(SUBSET)


def photo(subject: str, name: str) -> Image.Image:
    return Image.open(SUBSET / subject / name).convert("RGB")


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b)


class Recorder:
    """A `generate` that records its calls and returns a chosen image."""

    def __init__(self, answer):
        self.answer, self.calls = answer, []

    def __call__(self, prompt, subject_images, seed):
        self.calls.append((prompt, subject_images, seed))
        return self.answer(prompt, subject_images, seed)


# --- the dataset layout ---------------------------------------------------------------


def test_real_layout_parses_to_subjects_classes_and_prompts(bench):
    assert [(s.name, s.class_name, s.live, len(s.images)) for s in bench.subjects] == [
        ("dog", "dog", True, 2),
        ("red_cartoon", "cartoon", False, 1),
        ("teapot", "teapot", False, 1),
        ("vase", "vase", False, 1),
    ]
    assert len(bench.missing) == 26 and "wolf_plushie" in bench.missing and "dog" not in bench.missing
    assert len(bench.object_prompts) == 25 and len(bench.live_prompts) == 25
    assert bench.object_prompts[0] == bench.live_prompts[0] == "a {0} {1} in the jungle"
    assert bench.object_prompts[10] == "a {0} {1} with a wheat field in the background"
    assert bench.live_prompts[10] == "a {0} {1} wearing a red hat"
    assert bench.object_prompts[24] == "a cube shaped {0} {1}"


def test_full_class_table_is_read_exactly():
    table = PromptsAndClasses.parse((SUBSET / "prompts_and_classes.txt").read_text(encoding="utf-8"))
    assert len(table.classes) == 30
    assert table.classes["bear_plushie"] == "stuffed animal" and table.classes["pink_sunglasses"] == "glasses"
    live = sorted(name for name, cls in table.classes.items() if cls in ("cat", "dog"))
    assert live == ["cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"]


def test_cases_fill_the_class_word_and_pick_live_or_object_prompts(bench):
    cases = bench.single_subject_cases()
    assert len(cases) == 4 * 25
    by_key = {(c.key, c.prompt_index): c.prompt for c in cases}
    assert by_key["dog", 0] == "a dog in the jungle"
    assert by_key["dog", 10] == "a dog wearing a red hat"
    assert by_key["red_cartoon", 10] == "a cartoon with a wheat field in the background"
    assert by_key["teapot", 24] == "a cube shaped teapot"
    assert fill_prompt("a {0} {1} in the snow", "dog", "sks") == "a sks dog in the snow"
    pair = bench.multi_subject_cases([("dog", "teapot")])
    assert len(pair) == 25 and pair[0].key == "dog+teapot"
    assert pair[0].prompt == "a dog and a teapot in the jungle"
    assert pair[10].prompt == "a dog and a teapot wearing a red hat"  # live prompts: a dog is in the pair
    assert bench.multi_subject_cases([("teapot", "vase")])[10].prompt == (
        "a teapot and a vase with a wheat field in the background"
    )


def write_bench(root: Path, prompts: str, subjects: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    classes = "\n".join(f"{name},{cls}" for name, cls in subjects.items())
    (root / "prompts_and_classes.txt").write_text(
        f"Classes\n\nsubject_name,class\n{classes}\n\nPrompts\n\n{prompts}", encoding="utf-8"
    )
    return root


def prompt_lists(object_prompts: list[str], live_prompts: list[str]) -> str:
    def block(templates):
        items = ",\n".join(f"'{t}'.format(unique_token, class_token)" for t in templates)
        return f"prompt_list = [\n{items}\n]\n"

    return f"Object Prompts\n\n{block(object_prompts)}\nLive Subject Prompts\n\n{block(live_prompts)}"


def test_layout_errors_name_the_problem(tmp_path):
    with pytest.raises(DreamBenchError, match="no prompts_and_classes.txt"):
        DreamBench.load(tmp_path)
    root = write_bench(tmp_path / "a", prompt_lists(["a {0} {1}"], ["a {0} {1}"]), {"vase": "vase"})
    (root / "vase").mkdir()
    with pytest.raises(DreamBenchError, match=r"vase has no images"):
        DreamBench.load(root)
    Image.new("RGB", (8, 8)).save(root / "vase" / "00.jpg")
    (root / "mystery").mkdir()
    with pytest.raises(DreamBenchError, match=r"subject folder\(s\) \['mystery'\] .* have no class"):
        DreamBench.load(root)
    bad = write_bench(tmp_path / "b", prompt_lists(["a {0} {1}"], ["a {0} {1}"]).replace(
        "(unique_token, class_token)", "(class_token)", 1), {"vase": "vase"})
    with pytest.raises(DreamBenchError, match=r"under 'Object Prompts', expected .*got \"'a \{0\} \{1\}'.format\(class_token\)\""):
        DreamBench.load(bad)
    no_live = write_bench(tmp_path / "c", prompt_lists(["a {0} {1}"], ["a {0} {1}"]).split("Live")[0], {"vase": "vase"})
    with pytest.raises(DreamBenchError, match="no `prompt_list = \\[...\\]` under 'Live Subject Prompts'"):
        DreamBench.load(no_live)


def test_groups_file_and_unknown_subjects(tmp_path, bench):
    path = tmp_path / "pairs.txt"
    path.write_text("# pairs\ndog,teapot\n\nvase red_cartoon  # comment\n", encoding="utf-8")
    assert load_groups(path) == [("dog", "teapot"), ("vase", "red_cartoon")]
    with pytest.raises(DreamBenchError, match="no subject 'cat'"):
        bench.multi_subject_cases([("dog", "cat")])
    with pytest.raises(DreamBenchError, match="two or more different subjects"):
        bench.multi_subject_cases([("dog", "dog")])


# --- the metrics ----------------------------------------------------------------------


def test_dino_embedding_is_the_normalised_cls_token(model_paths, metrics):
    model = ViTModel.from_pretrained(model_paths[0])
    processor = ViTImageProcessor.from_pretrained(model_paths[0])
    image = photo("vase", "02.jpg")
    with torch.no_grad():
        cls = model(**processor(images=[image], return_tensors="pt")).last_hidden_state[0, 0]
    assert torch.allclose(metrics.dino_embed([image])[0], cls / cls.norm(), atol=1e-6)


def test_identical_images_score_one(bench, metrics):
    generate = Recorder(lambda prompt, refs, seed: refs[0])
    cases = bench.single_subject_cases(["teapot"])[:2]
    scores = evaluate(cases, generate, metrics, progress=False)
    assert scores.dino == pytest.approx(1.0, abs=1e-5)
    assert scores.clip_i == pytest.approx(1.0, abs=1e-5)
    assert scores.samples == 2


def test_fidelity_averages_over_the_subjects_real_photos_and_clip_t_uses_the_filled_prompt(bench, metrics):
    generate = Recorder(lambda prompt, refs, seed: refs[0])  # the reference, dog/03.jpg
    case = bench.single_subject_cases(["dog"])[0]
    scores = evaluate([case], generate, metrics, seed=5, progress=False)

    [(prompt, refs, seed)] = generate.calls
    assert prompt == "a dog in the jungle" and seed == 5 and len(refs) == 1
    assert refs[0].tobytes() == photo("dog", "03.jpg").tobytes()
    a, b = photo("dog", "03.jpg"), photo("dog", "04.jpg")
    dino = metrics.dino_embed([a, b])
    clip = metrics.clip_image_embed([a, b])
    assert scores.dino == pytest.approx((1 + cos(dino[0], dino[1])) / 2, abs=1e-5)
    assert scores.clip_i == pytest.approx((1 + cos(clip[0], clip[1])) / 2, abs=1e-5)
    text = metrics.clip_text_embed(["a dog in the jungle", "a {0} {1} in the jungle"])
    assert scores.clip_t == pytest.approx(cos(clip[0], text[0]), abs=1e-5)
    assert scores.clip_t != pytest.approx(cos(clip[0], text[1]), abs=1e-5)


def test_scores_average_over_subjects_prompts_and_images(tmp_path, metrics):
    root = write_bench(
        tmp_path / "bench",
        prompt_lists(["a {0} {1} in the jungle", "a red {0} {1}"], ["a {0} {1} on the beach", "a {0} {1} in the snow"]),
        {"dog": "dog", "vase": "vase"},
    )
    for name in ("dog", "vase"):
        (root / name).mkdir()
    photo("dog", "03.jpg").save(root / "dog" / "00.png")  # lossless: the test's photos are the bench's
    photo("vase", "02.jpg").save(root / "vase" / "00.png")
    bench = DreamBench.load(root)
    gray = Image.new("RGB", (48, 48), (128, 128, 128))

    # prompt 0, image 0: the reference itself; everything else: a gray square
    def answer(prompt, refs, seed):
        return refs[0] if prompt.endswith(("jungle", "beach")) and seed == 0 else gray

    generate = Recorder(answer)
    scores = evaluate(bench.single_subject_cases(), generate, metrics, images_per_prompt=2, progress=False)

    assert [c[2] for c in generate.calls] == [0, 1] * 4
    assert [c[0] for c in generate.calls[::2]] == [
        "a dog on the beach", "a dog in the snow", "a vase in the jungle", "a red vase"
    ]
    g_dino, g_clip = metrics.dino_embed([gray])[0], metrics.clip_image_embed([gray])[0]
    expected = {}
    for name, ref, prompts in (("dog", photo("dog", "03.jpg"), ["a dog on the beach", "a dog in the snow"]),
                               ("vase", photo("vase", "02.jpg"), ["a vase in the jungle", "a red vase"])):
        r_dino, r_clip = metrics.dino_embed([ref])[0], metrics.clip_image_embed([ref])[0]
        texts = metrics.clip_text_embed(prompts)
        dino = [1.0, cos(g_dino, r_dino), cos(g_dino, r_dino), cos(g_dino, r_dino)]
        clip_i = [1.0, cos(g_clip, r_clip), cos(g_clip, r_clip), cos(g_clip, r_clip)]
        clip_t = [cos(r_clip, texts[0]), cos(g_clip, texts[0]), cos(g_clip, texts[1]), cos(g_clip, texts[1])]
        expected[name] = [sum(v) / 4 for v in (dino, clip_i, clip_t)]
    assert scores.samples == 8
    for name in ("dog", "vase"):
        assert scores.per_subject[name] == pytest.approx(expected[name], abs=1e-5)
    assert [scores.dino, scores.clip_i, scores.clip_t] == pytest.approx(
        [(expected["dog"][i] + expected["vase"][i]) / 2 for i in range(3)], abs=1e-5
    )


def test_multi_subject_fidelity_is_averaged_over_the_subjects(bench, metrics):
    generate = Recorder(lambda prompt, refs, seed: refs[0])  # draws only the dog
    case = bench.multi_subject_cases([("dog", "teapot")])[0]
    scores = evaluate([case], generate, metrics, progress=False)

    [(prompt, refs, _)] = generate.calls
    assert prompt == "a dog and a teapot in the jungle"
    assert [r.size for r in refs] == [photo("dog", "03.jpg").size, photo("teapot", "03.jpg").size]
    dog3, dog4, teapot = photo("dog", "03.jpg"), photo("dog", "04.jpg"), photo("teapot", "03.jpg")
    e = metrics.dino_embed([dog3, dog4, teapot])
    dog_score = (1 + cos(e[0], e[1])) / 2
    assert scores.dino == pytest.approx((dog_score + cos(e[0], e[2])) / 2, abs=1e-5)
    assert list(scores.per_subject) == ["dog+teapot"]


def test_chosen_reference_photo_and_bad_choice(bench, metrics):
    generate = Recorder(lambda prompt, refs, seed: refs[0])
    case = bench.single_subject_cases(["dog"])[0]
    evaluate([case], generate, metrics, references={"dog": "04.jpg"}, progress=False)
    assert generate.calls[0][1][0].tobytes() == photo("dog", "04.jpg").tobytes()
    with pytest.raises(DreamBenchError, match="reference '09.jpg' is not among the photos of 'dog'"):
        evaluate([case], generate, metrics, references={"dog": "09.jpg"}, progress=False)


def test_saved_images_are_reused_on_a_second_run(tmp_path, bench, metrics):
    generate = Recorder(lambda prompt, refs, seed: Image.new("RGB", (40, 40), (seed * 40, 90, 30)))
    cases = bench.single_subject_cases(["vase"])[:2]
    first = evaluate(cases, generate, metrics, images_per_prompt=2, out_dir=tmp_path, progress=False)
    assert len(generate.calls) == 4
    assert sorted(p.name for p in (tmp_path / "vase").iterdir()) == ["00_0.png", "00_1.png", "01_0.png", "01_1.png"]
    second = evaluate(cases, generate, metrics, images_per_prompt=2, out_dir=tmp_path, progress=False)
    assert len(generate.calls) == 4
    assert (second.dino, second.clip_i, second.clip_t) == pytest.approx((first.dino, first.clip_i, first.clip_t))


def test_generate_must_return_an_image(bench, metrics):
    with pytest.raises(TypeError, match="must return a PIL image, got ndarray"):
        evaluate(bench.single_subject_cases(["vase"])[:1], lambda p, r, s: np.zeros((4, 4, 3)), metrics, progress=False)


def test_table_has_the_form_of_unos_table_1():
    table = format_table([BenchScores("AnyStory", 0.7604, 0.83549, 0.30411, 750), BenchScores("Plain SDXL", 0.2, 0.5, 0.333, 750)])
    assert table.splitlines() == [
        "| Method | DINO ↑ | CLIP-I ↑ | CLIP-T ↑ |",
        "|---|---|---|---|",
        "| AnyStory | 0.760 | 0.835 | 0.304 |",
        "| Plain SDXL | 0.200 | 0.500 | 0.333 |",
    ]


def test_metric_models_load_only_local_safetensors(tmp_path, model_paths):
    with pytest.raises(MetricModelError, match="DINO model must be a local model folder"):
        MetricModels.from_pretrained(tmp_path / "facebook" / "dino-vits16", model_paths[1])
    dino_bin, clip_bin = save_tiny_models(tmp_path / "pickled")
    pickle_weights(dino_bin)
    pickle_weights(clip_bin)
    with pytest.raises(MetricModelError, match="no safetensors weights in .*allow_pickle=True"):
        MetricModels.from_pretrained(dino_bin, clip_bin)
    loaded = MetricModels.from_pretrained(dino_bin, clip_bin, allow_pickle=True)
    assert loaded.dino_embed([Image.new("RGB", (32, 32))]).shape == (1, 32)
