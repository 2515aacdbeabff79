"""Each method's defining rule: which weights change between generations, which stay, which are 0."""
import numpy as np
import pytest

import conftest
from ke_tf import config as C, rules
from ke_tf import masks, networks, slim
from ke_tf.generations import GenerationRunner
from ke_tf.hooks import Hook, Hooks
from ke_tf.methods import dnr, dsd
from ke_tf.state import RunState

RESNET_PREFIXES = ("layer1", "layer2", "layer3", "layer4", "fc", "conv1", "bn1")


def runner(tmp_path, method="ke", generations=2, epochs=1, **split):
    cfg = conftest.tiny_config(tmp_path, split=split,
                               train=dict(generations=generations, epochs=epochs),
                               method=method, export=False)
    return GenerationRunner(cfg, verbose=False)


def train(r, generation):
    """Train generation `generation` of runner `r` from its first epoch, without side work."""
    r.train(RunState(generation=generation), Hooks([]))


def snapshot(net):
    return {v.path: v.numpy().copy() for v in net.weights}


def test_llf_resets_every_kernel_from_layer4_on(tmp_path):
    r = runner(tmp_path, method="llf", reset_from="layer4")
    before = snapshot(r.network)
    r.between_generations(1)
    after = snapshot(r.network)
    for path, value in before.items():
        layer = path.split("/")[0]
        reset = (layer.startswith("layer4") or layer == "fc") and path.endswith("kernel")
        assert (path in r.masks) == path.endswith(("kernel", "bias")), path
        if reset:
            assert (after[path] != value).all(), path
        else:  # earlier layers, every BatchNorm (layer4's too) and the classifier bias
            np.testing.assert_array_equal(after[path], value, err_msg=path)
    assert not r.masks["fc/kernel"].any() and r.masks["fc/bias"].all()
    assert r.masks["layer3_1_conv2/kernel"].all()
    # hypotheses.csv: a kernel reset whole has no fit hypothesis (an empty cell, not nan)
    state = RunState()
    state.record([], masks.hypothesis_magnitudes(r.network, r.masks))
    by_path = {h["variable"]: h for h in state.hypotheses}
    assert by_path["fc/kernel"]["fit_mean_abs"] == "" and by_path["fc/kernel"]["reset_mean_abs"] > 0
    assert by_path["layer3_1_conv2/kernel"]["reset_mean_abs"] == ""
    assert all(h["fit_mean_abs"] == "" or np.isfinite(h["fit_mean_abs"]) for h in state.hypotheses)


def test_llf_with_an_unknown_block_names_the_flag(tmp_path):
    with pytest.raises(C.ConfigError, match="--reset_from"):
        runner(tmp_path, method="llf", reset_from="block9")


def test_evolve_mode_zero_sets_the_reset_hypothesis_to_zero(tmp_path):
    r = runner(tmp_path, evolve_mode="zero")
    before = snapshot(r.network)
    r.between_generations(1)
    after = snapshot(r.network)
    for path, m in r.masks.items():
        np.testing.assert_array_equal(after[path][m], before[path][m])
        assert not after[path][~m].any(), path


def test_fix_reset_seed_draws_the_same_values_every_generation(tmp_path):
    fixed, fresh = runner(tmp_path / "a", fix_reset_seed=True), runner(tmp_path / "b")
    draws = {"fixed": [], "fresh": []}
    for name, r in (("fixed", fixed), ("fresh", fresh)):
        for g in (1, 2):
            r.between_generations(g)
            w, m = r.network.get_layer("layer2_0_conv1").kernel.numpy(), r.masks["layer2_0_conv1/kernel"]
            draws[name].append(w[~m])
    np.testing.assert_array_equal(*draws["fixed"])
    assert not np.array_equal(*draws["fresh"])


@pytest.mark.slow
def test_long_is_one_generation_of_all_the_epochs(tmp_path):
    r = runner(tmp_path, method="long", generations=3, epochs=2)
    assert r.method.schedule() == (1, 6)
    rows = r.run()
    assert {row["generation"] for row in rows} == {1} and {row["method"] for row in rows} == {"long"}
    assert r.model.optimizer.iterations.numpy() == 6 * 3  # 6 epochs of 3 batches (40 images / 16)


@pytest.mark.slow
def test_slim_scratch_trains_the_slim_architecture(tmp_path):
    r = runner(tmp_path, method="slim_scratch", generations=2, epochs=1)
    dense = networks.build("resnet18", 10, 16, width_multiplier=1 / 16)

    expected = slim.architecture(dense, masks.compute(dense, "kels", 0.5))
    assert [w.shape for w in r.network.weights] == [w.shape for w in expected.weights]
    initial = snapshot(r.network)
    assert not np.array_equal(initial["conv1/kernel"], expected.get_layer("conv1").kernel.numpy())
    rows = r.run()
    trained = snapshot(r.network)
    assert all(not np.array_equal(trained[k], initial[k]) for k in initial if k.endswith("kernel"))
    assert [(row["generation"], row["net"]) for row in rows] == [(1, "slim")]
    assert rows[0]["params"] == sum(int(np.prod(w.shape)) for w in expected.trainable_weights)


def test_tasks_metric_eval_survives_a_diverged_network():
    from ke_tf import tasks

    out = tasks.METRIC.evaluate(np.full((6, 4), np.nan, "float32"), np.arange(6) % 2, "test", 0)
    assert all(np.isnan(v) for v in out.values()) and "nmi" in out


def test_method_flags_validate():
    with pytest.raises(C.ConfigError, match="--wels_rand"):
        rules.check(C.RunConfig(method="llf",
                                split=C.SplitConfig(split_mode="wels", wels_rand=True)))
    with pytest.raises(C.ConfigError, match="--method"):
        rules.check(C.RunConfig(method="bogus"))
    with pytest.raises(C.ConfigError, match="--split_mode"):
        rules.check(C.RunConfig(method="slim_scratch", split=C.SplitConfig(split_mode="wels")))
    with pytest.raises(C.ConfigError, match="--evolve_mode"):
        C.SplitConfig(evolve_mode="orthogonal").validate()


def test_dsd_prunes_holds_at_zero_and_frees(tmp_path):
    r = runner(tmp_path, method="dsd", generations=3)
    train(r, 1)
    trained = snapshot(r.network)
    keep = dsd.dsd_keep(r.network, 0.3)
    for path, k in keep.items():  # exactly the 30% smallest |w| of every kernel
        w = np.abs(trained[path])
        assert (~k).sum() == int(round(0.3 * w.size))
        assert w[~k].max() <= w[k].min()
    r.between_generations(1)  # generation 2 is sparse
    pruned = snapshot(r.network)
    for path, value in trained.items():
        if path in keep:
            assert not pruned[path][~keep[path]].any()
            np.testing.assert_array_equal(pruned[path][keep[path]], value[keep[path]])
        else:  # BatchNorm and biases are untouched
            np.testing.assert_array_equal(pruned[path], value, err_msg=path)
    train(r, 2)
    after_sparse = snapshot(r.network)
    for path, k in keep.items():  # held at zero after every optimizer step
        assert not after_sparse[path][~k].any(), path
        assert (after_sparse[path][k] != pruned[path][k]).any(), path
    r.between_generations(2)  # generation 3 is dense again: the pruned weights are freed, from zero
    train(r, 3)
    freed = snapshot(r.network)
    assert all(freed[path][~k].any() for path, k in keep.items())


def test_dnr_scores_connection_sensitivity_and_keeps_the_top_share(tmp_path):
    import keras
    import tensorflow as tf

    from ke_tf import losses

    rng = np.random.default_rng(0)
    i = keras.Input((4, 4, 3))
    x = keras.layers.Conv2D(6, 3, name="conv")(i)
    model = keras.Model(i, keras.layers.Dense(3, name="fc")(keras.layers.Flatten()(x)))
    data = tf.data.Dataset.from_tensor_slices(
        (rng.normal(size=(12, 4, 4, 3)).astype("float32"), np.arange(12) % 3)).batch(4)
    scores = dnr.connection_sensitivity(model, data, num_batches=2)
    grads = [np.zeros(model.get_layer(n).kernel.shape) for n in ("conv", "fc")]
    for x_b, y_b in data.take(2):  # by hand: |w * sum_b |dL/dw||
        with tf.GradientTape() as tape:
            loss = losses.sparse_cross_entropy(y_b, model(x_b))
        for acc, g in zip(grads, tape.gradient(loss, [model.get_layer("conv").kernel,
                                                      model.get_layer("fc").kernel])):
            acc += np.abs(g.numpy())
    np.testing.assert_allclose(scores["conv/kernel"],
                               np.abs(model.get_layer("conv").kernel.numpy()) * grads[0], rtol=1e-5)
    glob = dnr.dnr_masks(model, data, 2, keep=0.4)
    kept = np.concatenate([glob[k].ravel() for k in scores])
    all_scores = np.concatenate([scores[k].ravel() for k in scores])
    assert kept.sum() == round(0.4 * kept.size)  # one global threshold (no ties here)
    assert all_scores[kept].min() >= all_scores[~kept].max()
    assert glob["conv/bias"].all() and glob["fc/bias"].all()
    per_layer = dnr.dnr_masks(model, data, 2, keep=0.4, per_layer=True)
    for k in scores:
        assert per_layer[k].sum() == round(0.4 * per_layer[k].size)


def test_dnr_runner_recomputes_the_mask_and_resets_the_rest(tmp_path):
    r = runner(tmp_path, method="dnr")
    assert r.masks == {}
    before = snapshot(r.network)
    r.between_generations(1)
    after = snapshot(r.network)
    saved = masks.load(str(tmp_path / "masks.npz"))
    assert saved.keys() == r.masks.keys()
    kernels = np.concatenate([r.masks[k].ravel() for k in r.masks if k.endswith("kernel")])
    assert abs(kernels.mean() - 0.5) < 0.01  # --split_rate of the kernel weights kept
    for path, value in before.items():
        m = r.masks.get(path)
        if m is None or path.endswith("bias"):  # BatchNorm and biases are never reset
            np.testing.assert_array_equal(after[path], value, err_msg=path)
        else:
            np.testing.assert_array_equal(after[path][m], value[m])
            assert (after[path][~m] != value[~m]).all()


def test_class_wise_kd_is_the_official_formula():
    import tensorflow as tf

    from ke_tf import losses

    rng = np.random.default_rng(1)
    a, p = rng.normal(size=(6, 5)).astype("float32"), rng.normal(size=(6, 5)).astype("float32")
    T = 4.0
    log_p = a / T - np.log(np.exp(a / T).sum(1, keepdims=True))  # torch.log_softmax(input/T)
    q = np.exp(p / T) / np.exp(p / T).sum(1, keepdims=True)      # torch.softmax(target/T)
    want = (q * (np.log(q) - log_p)).sum() * T**2 / 6            # KLDivLoss(sum) * T^2 / n
    np.testing.assert_allclose(losses.class_wise_kd(a, p, T).numpy(), want, rtol=1e-5)
    partners = tf.Variable(p)
    with tf.GradientTape() as tape:
        loss = losses.class_wise_kd(a, partners, T)
    assert tape.gradient(loss, partners) is None  # the partners are constant targets


def test_cskd_batches_hold_anchors_then_same_class_partners():
    from ke_tf import data as data_lib

    cfg = C.RunConfig(data=C.DataConfig(dataset="digits", image_size=16, batch_size=10,
                                        digits_per_class=4),
                      train=C.TrainConfig(regularizer="cskd")).validate()
    assert cfg.data.class_pairs
    data = data_lib.load(cfg.data)
    batches = list(data.train_from(0).take(data.steps_per_epoch))
    assert len(batches) == 4  # 40 images, batches of 10
    for _, y in batches:
        y = y.numpy()
        assert len(set(y[:5])) == 5 and (y[5:] == y[:5]).all()


def test_cskd_train_step_matches_the_official_computation(tmp_path):
    import keras
    import tensorflow as tf

    from ke_tf import losses
    from ke_tf.model import KEModel

    rng = np.random.default_rng(2)
    x = rng.normal(size=(8, 6, 6, 3)).astype("float32")
    y = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    i = keras.Input((6, 6, 3))
    h = keras.layers.BatchNormalization(momentum=0.9, name="bn")(keras.layers.Conv2D(4, 3, name="conv")(i))
    net = keras.Model(i, keras.layers.Dense(4, name="fc")(keras.layers.GlobalAveragePooling2D()(h)))
    ref = keras.models.clone_model(net)
    ref.set_weights(net.get_weights())
    model = KEModel(net, weight_decay=0.0, cskd=(4.0, 3.0))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=losses.SparseCrossEntropy())
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    with tf.GradientTape() as tape:  # the official code: CE on anchors + 3 * KD to partners
        anchor = ref(x[:4], training=True)
        loss = losses.sparse_cross_entropy(y[:4], anchor)
        with tape.stop_recording():
            partner = ref(x[4:], training=True)  # no_grad, BN in training mode
        loss += 3.0 * losses.class_wise_kd(anchor, partner, 4.0)
    grads = tape.gradient(loss, ref.trainable_variables)
    for v, g in zip(ref.trainable_variables, grads):
        v.assign(v - 0.1 * g)
    for a, b in zip(net.weights, ref.weights):  # BN statistics saw anchors, then partners
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)


def test_cskd_needs_an_even_batch():
    with pytest.raises(C.ConfigError, match="--batch_size"):
        C.RunConfig(data=C.DataConfig(batch_size=25), train=C.TrainConfig(regularizer="cskd")).validate()


class EpochWeights(Hook):
    """The conv kernels and the held-at-zero masks after every epoch, as the hooks see them."""

    def __init__(self):
        self.kernels, self.held = [], []

    def epoch_end(self, run, state):
        self.kernels.append({v.path: v.numpy().copy() for v in run.network.weights
                             if v.path.endswith("kernel") and len(v.shape) == 4})
        self.held.append(run.model.held())


def test_repr_phases_follow_the_paper():
    from ke_tf.methods.repr import phase_change, phase_lengths

    assert phase_lengths(200, None, None) == (50, 10)  # the KE paper's S1, S2 for 200 epochs
    assert phase_lengths(8, None, 3) == (2, 3)
    changes = {e: phase_change(e, 200, 50, 10) for e in range(1, 201)}
    assert [e for e, c in changes.items() if c == "drop"] == [50, 110, 170]
    assert [e for e, c in changes.items() if c == "restore"] == [60, 120, 180]


def test_repr_drops_the_filters_of_the_global_ranking(tmp_path):
    from ke_tf import repr_filters
    from ke_tf.methods.repr import conv_kernels

    cfg = conftest.tiny_config(tmp_path, method="repr", export=False,
                               train=dict(generations=1, epochs=5, repr_s1=2, repr_s2=1))
    r = GenerationRunner(cfg, verbose=False)
    trained = {p: v.numpy() for p, v in conv_kernels(r.network).items()}
    r.method.after_epoch(r, 2)  # the end of the first dense phase
    keep = repr_filters.drop_masks(trained, 0.3)
    for path, var in conv_kernels(r.network).items():
        w = var.numpy()
        assert not w[..., ~keep[path]].any(), path  # dropped: zero, and held there
        np.testing.assert_array_equal(w[..., keep[path]], trained[path][..., keep[path]])
        np.testing.assert_array_equal(r.model.held()[path], np.broadcast_to(keep[path], w.shape))
    assert sum((~k).sum() for k in keep.values()) == round(0.3 * sum(k.size for k in keep.values()))


@pytest.mark.slow
def test_repr_holds_the_dropped_filters_then_restores_them_orthogonally(tmp_path):
    seen = EpochWeights()
    cfg = conftest.tiny_config(tmp_path, method="repr", export=False,
                               train=dict(generations=1, epochs=5, repr_s1=2, repr_s2=1))
    r = GenerationRunner(cfg, verbose=False, hooks=[seen])
    assert r.method.schedule() == (1, 5)
    rows = r.run()
    assert [(row["generation"], row["net"], row["method"]) for row in rows] == [(1, "dense", "repr")]
    before_drop, dropped, restored = seen.kernels[0:3]  # after epochs 1, 2 (drop), 3 (restore)
    total = sum(k.shape[-1] for k in dropped.values())
    zero = {p: ~k.reshape(-1, k.shape[-1]).any(axis=0) for p, k in dropped.items()}
    assert sum(z.sum() for z in zero.values()) == round(0.3 * total)  # one global ranking
    for p, z in zero.items():
        assert (~seen.held[1][p][..., z]).all() and seen.held[1][p][..., ~z].all()
        assert seen.held[2][p].all()  # restored: nothing held any more
        if z.any() and (~z).any():
            new = restored[p].reshape(-1, z.size)[:, z]
            kept = restored[p].reshape(-1, z.size)[:, ~z]
            cos = (new / np.linalg.norm(new, axis=0)).T @ (kept / np.linalg.norm(kept, axis=0))
            assert np.abs(cos).max() < 1e-4, p  # orthogonal to every kept filter of the layer
    assert all(h.all() for held in seen.held[3:] for h in held.values())  # dense to the end


@pytest.mark.slow
def test_dsd_only_is_dense_sparse_dense_once(tmp_path):
    seen = EpochWeights()
    cfg = conftest.tiny_config(tmp_path, method="dsd_only", export=False,
                               train=dict(generations=2, epochs=4))
    r = GenerationRunner(cfg, verbose=False, hooks=[seen])
    assert r.method.schedule() == (1, 8)  # phases of 4, 2 and 2 epochs
    rows = r.run()
    assert [(row["generation"], row["net"]) for row in rows] == [(1, "dense")]
    for e, held in enumerate(seen.held, start=1):
        for path, h in held.items():
            if path not in seen.kernels[0]:
                continue
            w = seen.kernels[e - 1][path]
            if e in (4, 5):  # pruned after epoch 4, held at zero through epochs 5 and 6
                assert (~h).sum() == int(round(0.3 * h.size)) and not w[~h].any(), (e, path)
            else:
                assert h.all(), (e, path)
    pruned = ~seen.held[3]["conv1/kernel"]
    assert seen.kernels[7]["conv1/kernel"][pruned].any()  # free again, trained from zero


def test_dsd_only_needs_three_phases():
    with pytest.raises(C.ConfigError, match="--epochs"):
        rules.check(C.RunConfig(method="dsd_only", train=C.TrainConfig(generations=1, epochs=3,
                                                                       warmup_epochs=0)))


@pytest.mark.parametrize("method", ["repr", "dsd_only"])
def test_peer_methods_on_a_folder_dataset(tmp_path, method):
    root = conftest.image_folder(tmp_path / "imgs")
    cfg = conftest.tiny_config(tmp_path / "run", method=method, export=False,
                               data=dict(dataset=f"folder:{root}", batch_size=6, recal_images=12),
                               train=dict(generations=1, epochs=6, repr_s1=2, repr_s2=1))
    rows = GenerationRunner(cfg, verbose=False).run()
    assert [(r["generation"], r["net"], r["method"]) for r in rows] == [(1, "dense", method)]
    assert 0 <= rows[0]["test_top1"] <= 100 and np.isfinite(rows[0]["train_loss"])
