"""The vectorised input path gives exactly open_clip's preprocess tensors and embeddings."""
import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from clip_poison.attacks.triggers import get_trigger, trigger_names
from clip_poison.data.evalsets import load_evalset
from clip_poison.metrics.embed import EmbeddingCache, embed_images, identity_input_size
from clip_poison.victims.models import register_victims


@pytest.fixture(scope="module")
def model_and_preprocess():
    register_victims()
    torch.manual_seed(0)
    model, _, pre = open_clip.create_model_and_transforms("rn-tiny-32")
    return model.eval(), pre


def test_vectorised_path_equals_open_clip_preprocess_exactly(model_and_preprocess, tiny_world):
    model, pre = model_and_preprocess
    images = load_evalset(tiny_world / "eval").images[:40]
    assert identity_input_size(pre) == (32, 32)
    ours = embed_images(model, pre, images, batch_size=16, vectorised=True)
    with torch.no_grad():
        ref = torch.cat([model.encode_image(torch.stack([pre(Image.fromarray(im)) for im in images[s:s + 16]]),
                                            normalize=True) for s in range(0, 40, 16)]).numpy()
    assert np.array_equal(ours, ref)
    assert np.array_equal(ours, embed_images(model, pre, images, batch_size=16, vectorised=False))


@pytest.mark.parametrize("name", trigger_names())
def test_vectorised_trigger_stamping_equals_pil_path(model_and_preprocess, tiny_world, name):
    model, pre = model_and_preprocess
    images = load_evalset(tiny_world / "eval").images[:20]
    trigger = get_trigger(name, 4, 32)
    pos = [(i % 28, (3 * i) % 28) for i in range(20)]  # patch corners, or full-image shifts
    a = embed_images(model, pre, images, trigger, pos, vectorised=True)
    b = embed_images(model, pre, images, trigger, pos, vectorised=False)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, embed_images(model, pre, images))  # the trigger is really there


def test_other_sizes_fall_back_to_the_pil_path(model_and_preprocess):
    model, pre = model_and_preprocess
    big = [np.full((48, 40, 3), v, dtype=np.uint8) for v in (10, 200)]
    with pytest.raises(ValueError, match="input size"):
        embed_images(model, pre, big, vectorised=True)
    out = embed_images(model, pre, big)  # resized + cropped by open_clip's transform
    with torch.no_grad():
        ref = model.encode_image(torch.stack([pre(Image.fromarray(im)) for im in big]), normalize=True).numpy()
    assert np.array_equal(out, ref)


def test_cache_is_atomic_keyed_and_recovers_from_a_damaged_file(tmp_path):
    cache = EmbeddingCache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return np.ones((3, 2), dtype=np.float32)

    key = {"evalset": {"n": 3}, "trigger": None}
    cache.get(key, compute)
    cache.get(key, compute)
    assert len(calls) == 1 and (cache.hits, cache.misses) == (1, 1)
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left behind
    cache.get({**key, "trigger": "x"}, compute)
    assert len(calls) == 2
    cache.path_for(key).write_bytes(b"garbage")
    assert np.array_equal(cache.get(key, compute), np.ones((3, 2)))
    assert len(calls) == 3
