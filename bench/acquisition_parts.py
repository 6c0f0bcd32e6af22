"""The working parts of `bench/acquisition.py`: the two simulated worlds, one annotator loop, the figures.

A loop (`run_loop`): a pool of open tasks whose expert labels the simulation knows but the learner
does not; an annotator labels `BATCH` tasks at a time, in random order or in the acquisition
score's order; after each batch the adapter is refitted on every label so far and scored on a
held-out set. `labels_to_target` and `labels_ratio` turn the curves into the bench's headline.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch

from ground.schemas import FeatureTriple, PairwiseText
from ingest.synthetic_families import appendix_d_family, draw_triples
from policies.acquisition import AcquisitionScores, rank
from policies.features.acquisition import EnsembleConfig, feature_scores
from policies.features.fit_recipe import FitRecipe
from policies.features.fitting import fit_adapter, fit_stage1
from policies.features.model import TwoStagePolicy, triples_to_tensors
from policies.features.recipe import TWO_STAGE
from policies.lm.acquisition import RelabellingConfig, relabelling_scores
from policies.lm.mixture_learners import MixtureTerms, fit_relabelling, relabelled_margin
from workers.lm.mode_mixture_training import FrozenBase, MixtureRecipe, train_proxy

BATCH = 5  # expert labels per batch; the adapter is refitted after each
Order = Literal["random", "ranked"]


# ------------------------------------------------------------------------------------- the figures


def labels_to_target(curve: dict[int, float], target: float) -> tuple[float, bool]:
    """Labels at which `curve` (labels -> held-out accuracy) first reaches `target`, linearly
    interpolated between the two budgets around the crossing; (largest budget, False) when it never
    does: a lower bound. At or above the target at the smallest budget: that budget."""
    sizes = sorted(curve)
    if not sizes:
        raise ValueError("an empty curve reaches nothing")
    previous: int | None = None
    for n in sizes:
        if curve[n] >= target:
            if previous is None:
                return float(n), True
            low, high = curve[previous], curve[n]
            return previous + (n - previous) * (target - low) / (high - low), True
        previous = n
    return float(sizes[-1]), False


def mean_curve(curves: Sequence[dict[int, float]]) -> dict[int, float]:
    """The average of curves measured at the same budgets."""
    sizes = sorted(curves[0])
    return {n: float(np.mean([c[n] for c in curves])) for n in sizes}


@dataclass(frozen=True)
class RatioFigure:
    ratio: float  # random ÷ ranked labels to target
    random_labels: float
    ranked_labels: float
    ranked_reached: bool  # False: ranked never got there, ranked_labels is a lower bound (ratio an upper bound)
    target: float


def labels_ratio(random: Sequence[dict[int, float]], ranked: Sequence[dict[int, float]], reference: int) -> RatioFigure:
    """Target = the averaged random curve's accuracy at `reference` labels; labels each averaged curve
    needs to reach it (`labels_to_target`); their ratio, random ÷ ranked."""
    random_mean, ranked_mean = mean_curve(random), mean_curve(ranked)
    target = random_mean[reference]
    random_labels, _ = labels_to_target(random_mean, target)  # random reaches it by `reference`, by definition
    ranked_labels, reached = labels_to_target(ranked_mean, target)
    return RatioFigure(random_labels / ranked_labels, random_labels, ranked_labels, reached, target)


def bootstrap_ratios(
    random: dict[int, list[dict[int, float]]],
    ranked: dict[int, list[dict[int, float]]],
    reference: int,
    resamples: int,
    rng: np.random.Generator,
) -> list[float]:
    """The ratio over `resamples` resamples of the seeds (keys; each seed's worlds travel together)."""
    seeds = sorted(random)
    out = []
    for _ in range(resamples):
        pick = rng.choice(len(seeds), size=len(seeds), replace=True)
        rand = [c for i in pick for c in random[seeds[i]]]
        rnk = [c for i in pick for c in ranked[seeds[i]]]
        out.append(labels_ratio(rand, rnk, reference).ratio)
    return out


# --------------------------------------------------------------------------------------- the loop


class World(Protocol):
    """A pool of open tasks with hidden expert labels, and a learner refitted on any subset of them."""

    n_pool: int

    def refit(self, chosen: Sequence[int]) -> Any: ...
    def accuracy(self, model: Any) -> float: ...
    def scores(self, model: Any, chosen: Sequence[int], open_tasks: Sequence[int], seed: int) -> AcquisitionScores: ...


def run_loop(
    world: World, order: Order, budget: int, seed: int, on_batch: Callable[[int, float], None] | None = None
) -> dict[int, float]:
    """Held-out accuracy after each batch of BATCH labels, up to `budget`: in random order (a fixed
    permutation of the pool from `seed`) or ranked (the open task with the highest acquisition score
    under the adapter refitted on every label so far, BATCH at a time)."""
    permutation = np.random.default_rng([seed, 17]).permutation(world.n_pool).tolist()
    chosen: list[int] = []
    model = world.refit(chosen)
    curve: dict[int, float] = {}
    while len(chosen) < budget:
        if order == "random":
            batch = permutation[len(chosen) : len(chosen) + BATCH]
        else:
            taken = set(chosen)
            open_tasks = [i for i in permutation if i not in taken]  # pool order breaks exact ties at random
            scores = world.scores(model, chosen, open_tasks, seed * 1000 + len(chosen))
            batch = [int(t) for t in rank(scores.scores, list(range(len(open_tasks))))[:BATCH]]
            batch = [open_tasks[i] for i in batch]
        chosen += batch
        model = world.refit(chosen)
        curve[len(chosen)] = world.accuracy(model)
        if on_batch is not None:
            on_batch(len(chosen), curve[len(chosen)])
    return curve


# ----------------------------------------------------------------------- the Appendix D feature family


@dataclass
class FeatureWorld:
    """One Appendix D world (seed, proxy kind): stage 1 on proxy triples (the worker's TWO_STAGE
    proxy stage), a pool of open tasks (x, y_a, y_b) with Bradley–Terry expert labels, held-out
    inputs scored on all three pairs of the expert's outputs (bench/appendix_d.py's accuracy).

    Refit after each batch, from the stage-1 stack, at the prior its ensemble's members get
    (`EnsembleConfig.adapter_stage`): by default the single adapter of the worker's `fit_two_stage_adapter` (the
    adapter prior picked by 5-fold cross-validation over 6 values, batched, then `fit_adapter` at it; the worker then
    replaces it by its distilled bootstrap bag, not run here, so every acquisition rule is compared on the same
    single-adapter refit), or with `--fixed-prior` the recipe's stage prior (ADAPTER_STAGE.adapter_prior)."""

    stack: TwoStagePolicy
    labels: list[FeatureTriple]  # the pool's hidden expert labels
    x: np.ndarray
    y_a: np.ndarray
    y_b: np.ndarray
    test_x: torch.Tensor
    test_log_probs: np.ndarray
    ensemble: EnsembleConfig
    n_pool: int = 0
    # The last refit's labels and stage-2 fit: the ensemble's members are fitted at the same prior, and its
    # cross-validation reads only the frozen τ̃ and head, so the batch's scores reuse it instead of refitting 30 folds.
    refitted: tuple[tuple[int, ...], FitRecipe] | None = None

    @classmethod
    def build(
        cls,
        seed: int,
        kind: str,
        n_proxy: int,
        n_pool: int,
        n_test: int,
        ensemble: EnsembleConfig,
    ) -> FeatureWorld:
        world = appendix_d_family(seed, kind)
        rng = np.random.default_rng([seed, 1700])
        with torch.random.fork_rng(devices=[]):  # torch seeds itself at random per process: fix the init
            torch.manual_seed(seed)
            stack = TwoStagePolicy(TWO_STAGE.config(world.input_dim, world.n_outputs))
        fit_stage1(stack, *triples_to_tensors(draw_triples(world, n_proxy, False, rng)), seed, TWO_STAGE.proxy_stage)
        x = rng.standard_normal((n_pool, world.input_dim))
        n_expert = world.expert_outputs
        y_a = rng.integers(0, n_expert, n_pool)
        y_b = (y_a + rng.integers(1, n_expert, n_pool)) % n_expert
        probs = world.expert_probs(x)
        rows = np.arange(n_pool)
        a_wins = rng.random(n_pool) < probs[rows, y_a] / (probs[rows, y_a] + probs[rows, y_b])
        labels = [
            FeatureTriple(
                x=x[i].tolist(), y_w=int(y_a[i] if a_wins[i] else y_b[i]), y_l=int(y_b[i] if a_wins[i] else y_a[i])
            )
            for i in range(n_pool)
        ]
        test_x = rng.standard_normal((n_test, world.input_dim))
        return cls(
            stack.eval(),
            labels,
            x,
            y_a,
            y_b,
            torch.tensor(test_x, dtype=torch.float32),
            world.expert_log_probs(test_x),
            ensemble,
            n_pool,
        )

    def refit(self, chosen: Sequence[int]) -> TwoStagePolicy:
        model = copy.deepcopy(self.stack)
        if not chosen:
            return model  # no expert label yet: the proxy as is (the adapter at the identity)
        data = triples_to_tensors([self.labels[i] for i in chosen])
        stage = self.ensemble.adapter_stage(model, *data)
        self.refitted = (tuple(chosen), stage)
        fit_adapter(model, *data, seed=0, recipe=stage)
        return model.eval()

    def accuracy(self, model: TwoStagePolicy) -> float:
        gold = self.test_log_probs
        with torch.no_grad():
            lp = model.log_probs(self.test_x).double().numpy()[:, : gold.shape[1]]
        agree = [np.sign(lp[:, a] - lp[:, b]) == np.sign(gold[:, a] - gold[:, b]) for a, b in ((0, 1), (0, 2), (1, 2))]
        return float(np.mean(agree))

    def scores(
        self, model: TwoStagePolicy, chosen: Sequence[int], open_tasks: Sequence[int], seed: int
    ) -> AcquisitionScores:
        rows = np.asarray(open_tasks)
        config = replace(self.ensemble, seed=seed)
        if self.refitted is not None and self.refitted[0] == tuple(chosen):  # the stage-2 fit just chosen for them
            config = replace(config, cv_prior=False, recipe=replace(config.recipe, adapter_stage=self.refitted[1]))
        return feature_scores(
            model, [self.labels[i] for i in chosen], self.x[rows], self.y_a[rows], self.y_b[rows], config,
        )


# ------------------------------------------------------------------------------- the generated chat task


@dataclass
class ChatWorldLoop:
    """One chat world (seed, judge) on the mode-mixture reading: stage 1 = `train_proxy` on the judge's proxy pairs
    over the frozen base (the worker's function, seconds on CPU), its terms of every pool and held-out pair read once
    (`mixture_pair_features`, pairs read a vs b so the label stays hidden). Refit per batch: stage 2's relabelling of
    the D modes fitted on the labels so far (`fit_relabelling`; no label: the identity, stage 1 as is); accuracy:
    the relabelled mixture's margin (`relabelled_margin`) against the sign of the gold-reward difference. Score:
    `relabelling_scores`, BALD over relabellings drawn from their posterior given the labels so far."""

    pool: MixtureTerms  # [n_pool] a vs b
    test: MixtureTerms  # [n_test] a vs b
    sign: np.ndarray  # [n_pool] +1 where the expert chose a, −1 where b
    gold: np.ndarray  # [n_test] gold reward of a − b (nonzero)
    config: RelabellingConfig
    n_pool: int = 0
    proxy_accuracy: float = 0.0  # stage 1 (the identity relabelling) against gold on the held-out pairs

    @classmethod
    def build(
        cls, seed: int, judge: str, n_proxy: int, n_pool: int, n_test: int, config: RelabellingConfig, base: FrozenBase,
        recipe: MixtureRecipe,
    ) -> ChatWorldLoop:
        from bench.lm_proxy_parts import pair_rows
        from ingest.synthetic_judges import make_world
        from workers.lm.mixture_features import mixture_pair_features

        world = make_world(seed, judge)
        stage1, _ = train_proxy(
            base.encode(pair_rows(world.pairs(n_proxy, "proxy", seed), "proxy")), base.head, replace(recipe, seed=seed)
        )
        pairs = world.pairs(n_pool + 4 * n_test, "expert", seed)
        pool = pairs[:n_pool]
        test = [
            p
            for p in pairs[n_pool:]
            if world.gold_reward(p.prompt, p.response_a) != world.gold_reward(p.prompt, p.response_b)
        ][:n_test]
        shown = [
            PairwiseText(prompt=p.prompt, response_a=p.response_a, response_b=p.response_b, choice="a")
            for p in pool + test
        ]  # read a vs b: the label stays hidden
        terms = mixture_pair_features(stage1, base.encode(pair_rows(shown, "expert")), base.head, recipe.beta).mixture
        assert terms is not None
        gold = np.array(
            [world.gold_reward(p.prompt, p.response_a) - world.gold_reward(p.prompt, p.response_b) for p in test]
        )
        sign = np.array([1.0 if p.choice == "a" else -1.0 for p in pool])
        loop = cls(terms.take(slice(0, n_pool)), terms.take(slice(n_pool, None)), sign, gold, config, n_pool)
        loop.proxy_accuracy = loop.accuracy(loop.refit([]))
        return loop

    def refit(self, chosen: Sequence[int]) -> np.ndarray:
        if not chosen:
            return np.arange(self.pool.log_weights.shape[1])  # no expert label: stage 1 as is
        rows = np.asarray(chosen, dtype=int)
        return fit_relabelling(self.pool.take(rows).oriented(self.sign[rows]))

    def accuracy(self, model: np.ndarray) -> float:
        margin = relabelled_margin(self.test, model)  # an exact tie is a coin flip: half right
        return float(np.mean(np.where(margin == 0, 0.5, np.sign(margin) == np.sign(self.gold))))

    def scores(
        self, model: np.ndarray, chosen: Sequence[int], open_tasks: Sequence[int], seed: int
    ) -> AcquisitionScores:
        rows = np.asarray(chosen, dtype=int)
        return relabelling_scores(
            self.pool.take(rows).oriented(self.sign[rows]),
            self.pool.take(np.asarray(open_tasks, dtype=int)),
            model,
            replace(self.config, seed=seed),
        )


@dataclass
class FamilyResult:
    """Curves per seed (each seed: one curve per world of the family), both orders."""

    random: dict[int, list[dict[int, float]]] = field(default_factory=dict)
    ranked: dict[int, list[dict[int, float]]] = field(default_factory=dict)

    def add(self, seed: int, random: dict[int, float], ranked: dict[int, float]) -> None:
        self.random.setdefault(seed, []).append(random)
        self.ranked.setdefault(seed, []).append(ranked)

    def flat(self) -> tuple[list[dict[int, float]], list[dict[int, float]]]:
        return (
            [c for s in sorted(self.random) for c in self.random[s]],
            [c for s in sorted(self.ranked) for c in self.ranked[s]],
        )


# ------------------------------------------------------------------ refresh through the embedded stack


def stack_refresh(
    world: FeatureWorld, n_before: int, n_open: int, rounds: int, say: Callable[[str], None]
) -> dict[str, Any]:
    """Label event → new scores served to Label Studio, through the embedded stack.

    Starts Label Studio and an isolated `proxyloop up` stack (Kafka, Prefect server serving the
    `refresh-acquisition` deployment, HTTP app with the ML backend, consumer, store), registers the
    world's stage-1 stack as the production policy, provisions a project with `n_open` feature tasks,
    stores `n_before` expert labels (through Kafka and the consumer) and lets a first refresh run. Then,
    at t0, one new expert label is published on Kafka (what the ingest webhook does with a Label Studio
    annotation) and the ML backend's /webhook is posted an ANNOTATION_CREATED (what Label Studio sends a
    connected ML backend); `refresh_s` is t0 → Label Studio's API serving the refreshed scores as the
    tasks' predictions, with their version selected for the project (the refresh writes them there after
    its cache; median of `rounds`, each a new label). Not covered: Label Studio's own webhook delivery
    (the bench posts both webhooks' effects) and the browser's reload."""
    import os
    import tempfile
    import time
    import uuid

    import httpx

    from flows.acquisition import MIN_INTERVAL_S
    from ground.schemas import ExpertLabel
    from ground.settings import get_settings
    from ingest.bus import make_producer, publish
    from ingest.labelstudio.provision import client_for, setup_project
    from policies.ml_backend import ML_BACKEND_PREFIX
    from policies.registry import register
    from proxyloop import stack, testing

    home = Path(tempfile.mkdtemp(prefix="acquisition-stack-"))
    started = time.perf_counter()
    labelstudio = contextlib.ExitStack()
    ls = labelstudio.enter_context(testing.labelstudio_server(home / "labelstudio", testing.free_port()))
    say(f"stack refresh: Label Studio up ({time.perf_counter() - started:.0f} s)")
    settings = testing.isolated_settings(
        home / "proxyloop",
        labelstudio_url=ls.url,
        labelstudio_token=ls.token,
        webhook_secret="bench-secret",
        labelstudio_project_title="acquisition bench",
        retrain_min_expert=10**6,
        retrain_min_proxy=10**6,
    )
    saved_env = dict(os.environ)
    os.environ.update({k: v for k, v in stack.child_env(settings).items() if k.startswith(("PROXYLOOP_", "PREFECT_"))})
    get_settings.cache_clear()
    headers = {"X-Proxyloop-Secret": "bench-secret"}
    base = f"http://127.0.0.1:{settings.http_port}{ML_BACKEND_PREFIX}"
    try:
        register(
            settings.registry_dir,
            settings.policy_name,
            world.stack.state_dict(),
            {"family": "two_stage", "model": world.stack.config.to_dict()},
            {"source": "bench.acquisition"},
        )
        stack.up(settings, lambda m: None)
        say(f"stack refresh: proxyloop stack up ({time.perf_counter() - started:.0f} s)")
        tasks = [
            {
                "prompt": f"features task {i}",
                "answer_a": f"output {world.y_a[i]}",
                "answer_b": f"output {world.y_b[i]}",
                "x": world.x[i].tolist(),
                "y_a": int(world.y_a[i]),
                "y_b": int(world.y_b[i]),
            }
            for i in range(n_before, n_before + n_open)
        ]
        project = setup_project(settings, tasks)
        producer = make_producer(settings)

        def label(i: int) -> None:
            publish(
                producer,
                settings.topic_expert,
                ExpertLabel(event_id=f"bench-{i}-{uuid.uuid4().hex[:6]}", annotator_id="bench", item=world.labels[i]),
            )

        def refreshed_after(t: float, timeout_s: float) -> Any:
            cache = testing.score_cache_after(settings, t, timeout_s, poll_s=0.1)
            if cache is None:
                raise TimeoutError(f"no refresh within {timeout_s} s of the label event")
            return cache

        def served_by_labelstudio(cache: Any, timeout_s: float) -> None:
            """Until Label Studio's API holds each open task's refreshed score, its version selected."""
            deadline, ls_client = time.monotonic() + timeout_s, client_for(settings)
            while time.monotonic() < deadline:
                held = {
                    p.task: p.score
                    for p in ls_client.predictions.list(project=project.project_id)
                    if p.model_version == cache.model_version
                }
                if (
                    all(held.get(t) is not None and abs(held[t] - s.score) <= 1e-9 for t, s in cache.tasks.items())
                    and ls_client.projects.get(project.project_id).model_version == cache.model_version
                ):
                    return
                time.sleep(0.1)
            raise TimeoutError(f"Label Studio did not serve the refreshed scores within {timeout_s} s")

        def webhook() -> None:
            httpx.post(
                f"{base}/webhook",
                headers=headers,
                timeout=30,
                json={"action": "ANNOTATION_CREATED", "project": {"id": project.project_id}},
            ).raise_for_status()

        for i in range(n_before):
            label(i)
        first_at = time.time()
        webhook()
        first = refreshed_after(first_at, 300)
        say(f"stack refresh: first refresh {first.method} on {first.n_labels} labels, {len(first.tasks)} tasks")
        times, cache = [], first
        for r in range(rounds):
            # past the flow's 20 s rate limit, so the next label is not folded into the last refresh
            time.sleep(max(0.0, cache.refreshed_at.timestamp() + MIN_INTERVAL_S + 1 - time.time()))
            t0 = time.time()
            label(n_before + n_open + r)  # a pool task not imported: the label of a task just annotated
            webhook()
            cache = refreshed_after(t0, 300)
            served_by_labelstudio(cache, 300)
            times.append(time.time() - t0)
            say(
                f"stack refresh: round {r + 1}: label event → new scores in Label Studio in {times[-1]:.2f} s "
                f"({cache.n_labels} labels seen of {n_before + r + 1} sent)"
            )
        producer.close()
        return {
            "refresh_s": float(np.median(times)),
            "rounds_s": [round(t, 3) for t in times],
            "labels_seen": cache.n_labels,
            "labels_sent": n_before + rounds,
            "method": cache.method,
            "open_tasks": len(cache.tasks),
        }
    finally:
        try:
            stack.down(settings)
        finally:
            labelstudio.close()
            os.environ.clear()
            os.environ.update(saved_env)
            get_settings.cache_clear()
            import shutil

            shutil.rmtree(home, ignore_errors=True)
