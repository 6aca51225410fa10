"""The store's feature network: cached per store and settings, a classifier when the store has classes."""

import numpy as np
import torch

from medvae.evaluation.features import FeatureNet, embed, feature_net
from tests.factories import patch_store, tiny_disc_store


def test_autoencoder_features_are_cached_with_the_store(tmp_path):
    store = tiny_disc_store(tmp_path / "store")
    net = feature_net(store, steps=5, batch_size=8)
    assert net.n_classes == 0  # no classes: an autoencoder
    (cached,) = (store.path / "features").glob("*.pt")
    again = feature_net(store, steps=5, batch_size=8)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
    assert feature_net(store, steps=6, batch_size=8) is not None and len(list(cached.parent.glob("*.pt"))) == 2
    f = embed(net, torch.from_numpy(store.get(np.arange(10))))
    assert f.shape == (10, 128) and torch.isfinite(f).all()


def test_classifier_when_the_store_has_classes(tmp_path):
    rng = np.random.default_rng(0)
    n = 64
    bright = np.arange(n) % 2 == 0
    x = rng.uniform(0, 0.2, (n, 1, 32, 32)).astype(np.float32)
    x[bright, :, 8:24, 8:24] += 0.7  # class "a": a bright square
    store = patch_store(tmp_path / "s", x, patient_id=[f"I{i}" for i in range(n)], modality="microscopy",
                        slice_index=0, classes=np.where(bright, "a", "b").tolist(), content_hash="classes")
    net = feature_net(store, steps=40, batch_size=16)
    assert net.n_classes == 2
    with torch.no_grad():
        logits = net.head(net.features(torch.from_numpy(x)))
    accuracy = (logits.argmax(1).numpy() == np.where(bright, 0, 1)).mean()
    assert accuracy == 1.0  # the two classes are trivially separable
    assert FeatureNet.prepare(torch.ones(1, 1, 128, 128)).shape[-1] == 64  # large patches are area-downsampled
