"""The smallest keras.applications model of each of the 14 families trained through Knowledge
Evolution: two generations of `ke_tf.evolve`, the slim network equal to the trained dense one
with its reset hypothesis zeroed (real BatchNorm statistics), exported as a SavedModel and
served. (Every constructor's masks and equivalence: tests/test_applications.py.)"""
import numpy as np
import pytest
import tensorflow as tf

import conftest
import ke_tf
from ke_tf.hooks import Hook


class Eagerly(Hook):
    """Trains and evaluates without tracing: for one step per epoch and one batch to predict
    on these big graphs, eager execution is 3-5x faster than tracing the training step, and
    saves a trace of `predict` per network (InceptionResNetV2: 4 s of 25). What is tested here
    is the graph code, masks, resets and slim networks of each family; the traced steps are
    every other test's."""

    def generation_start(self, run, state):
        for model in [run.model, *run.nets.values()]:
            model.run_eagerly = True


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(conftest.APPLICATION_FAMILIES.values()))
def test_every_family_evolves_slims_exactly_and_exports(name, tmp_path):
    from ke_tf import export

    model = conftest.keras_application(name)
    side = model.input.shape[1]
    x = np.random.default_rng(0).normal(size=(4, side, side, 3)).astype("float32")
    train = tf.data.Dataset.from_tensor_slices((x, np.arange(4))).batch(4)
    result = ke_tf.evolve(model, train, generations=2, epochs=1, warmup_epochs=0, lr=0.01,
                          split_rate=0.5, run_dir=str(tmp_path / "run"), export=False,
                          verbose=False, hooks=[Eagerly()])
    assert [r["net"] for r in result.rows] == ["dense", "slim", "slim_recal"] * 2
    assert all(np.isfinite(r["train_loss"]) for r in result.rows)
    path = export.save_saved_model(result.slim, str(tmp_path / "slim"))
    served = tf.saved_model.load(path).signatures["serving_default"]
    # Traced (oneDNN-fused) and eager kernels round apart, amplified by BatchNorm statistics of
    # 4 images: up to 0.3% of the largest logit seen; a wrong weight moves them by O(1).
    want = result.slim(x[:2], training=False).numpy()
    np.testing.assert_allclose(served(images=x[:2])["logits"].numpy(), want,
                               atol=1e-2 * np.abs(want).max())
    # the run's own H_g (fit weights and BatchNorm statistics copied, not re-estimated)
    conftest.assert_slim_equals_dense_without_reset(result.dense, result.runner.masks,
                                                    result.runner.nets["slim"])
