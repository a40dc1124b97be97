"""The captioned-shapes world: renderer, captions and analyzer agree on all 3,024 scenes."""
import numpy as np
import pytest

from engine import shapes
from engine.shapes import Scene, all_captions, analyze, caption, parse_caption, render


def test_caption_count_and_example():
    caps = all_captions()
    assert len(caps) == 3024 == len(set(caps))
    scene = Scene("small", "red", "circle", "top left", "blue")
    assert caption(scene) == "a small red circle in the top left on a blue background"


def test_caption_round_trip():
    for text in all_captions():
        assert caption(parse_caption(text)) == text


@pytest.mark.parametrize("bad", ["", "a small red circle", "a tiny red circle in the top left on a blue background",
                                 "a small red circle in the top on a blue background",
                                 "a small red circle in the top left on a red background",
                                 "a small red blob in the top left on a blue background"])
def test_parse_caption_rejects(bad):
    with pytest.raises(ValueError):
        parse_caption(bad)


def test_render_geometry():
    img = render(Scene("small", "red", "square", "top left", "blue"), 32)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    red = (img == np.array(shapes.PALETTE["red"], np.uint8)).all(axis=2)
    ys, xs = np.nonzero(red)
    assert red.sum() == 64 and (xs.min(), xs.max(), ys.min(), ys.max()) == (4, 11, 4, 11)
    big = render(Scene("large", "white", "circle", "centre", "black"), 32, antialias=True)
    assert big.shape == (32, 32, 3)


def test_analyzer_reads_every_caption():
    for scene in shapes.all_scenes():
        for aa in (False, True):
            assert analyze(render(scene, 32, antialias=aa)) == scene, (scene, aa)


def test_analyzer_reads_augmented_scenes():
    rng = np.random.default_rng(0)
    for scene in shapes.all_scenes():
        shift = tuple(rng.uniform(-0.04 * 32, 0.04 * 32, size=2))
        scale = rng.uniform(0.9, 1.1)
        img = render(scene, 32, antialias=bool(rng.integers(2)), shift=shift, scale=scale)
        assert analyze(img) == scene, (scene, shift, scale)


def test_training_examples_read_back():
    rng = np.random.default_rng(1)
    for _ in range(300):
        img, text = shapes.sample_training_example(rng, 32)
        assert img.shape == (32, 32, 3)
        assert analyze(img) == parse_caption(text)


def test_analyzer_no_shape():
    blank = np.zeros((32, 32, 3), np.uint8) + np.array(shapes.PALETTE["green"], np.uint8)
    assert analyze(blank) is None
    two = render(Scene("small", "red", "square", "top left", "green"), 32)
    two[20:28, 20:28] = shapes.PALETTE["red"]
    assert analyze(two) is None


def test_star_extension_reads_back_and_leaves_the_three_kinds_alone():
    """The spec's star (docs/shapes_spec.md, extension): rendered, captioned and read back when the analyzer is
    told about stars; the original kinds read exactly as before with or without it."""
    import itertools

    from engine import shapes as S

    stars = [S.Scene(z, c, "star", p, b) for z, c, p, b in itertools.product(S.SIZES, S.COLOURS, S.POSITIONS, S.COLOURS)
             if c != b]
    for aa in (False, True):
        assert all(S.analyze(S.render(sc, 32, antialias=aa), kinds=S.ALL_KINDS) == sc for sc in stars)
        assert all(S.analyze(S.render(sc, 32, antialias=aa)).kind != "star" for sc in stars[:50])
    assert S.parse_caption("a large yellow star in the center on a blue background").kind == "star"
    for sc in S.all_scenes()[::7]:
        img = S.render(sc, 32, antialias=True)
        assert S.analyze(img, kinds=S.ALL_KINDS) == S.analyze(img) == sc
    assert "star" not in " ".join(S.all_captions())  # the built-in models' world is unchanged
