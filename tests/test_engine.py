"""The batching engine on a tiny model: rows are independent of their batch, stop on their own,
and a bad request fails alone."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

import actadd
from actadd.batching import Request as Row
from actadd.hooks import actadd_hooks
from actadd.sampling import Sampling
from actadd.serve.engine import Engine, EngineClosed, Event, Job, QueueFull
from actadd.sites import Site
from actadd.steering import Injection


class Collector:
    """A job's events, gathered; ``wait()`` blocks until every row is done or the job failed."""

    def __init__(self, n: int) -> None:
        self.texts = [""] * n
        self.reasons: dict[int, str] = {}
        self.tokens: dict[int, int] = {}
        self.error: BaseException | None = None
        self.kinds: list[str] = []
        self._done = threading.Event()
        self._n = n

    def __call__(self, ev: Event) -> None:
        self.kinds.append(ev.kind)
        if ev.kind == "delta":
            self.texts[ev.row] += ev.text
        elif ev.kind == "done":
            self.reasons[ev.row], self.tokens[ev.row] = ev.reason, ev.tokens
            if len(self.reasons) == self._n:
                self._done.set()
        elif ev.kind == "error":
            self.error = ev.error
            self._done.set()

    def wait(self) -> Collector:
        assert self._done.wait(60), "the engine did not finish the job"
        return self


def run(engine: Engine, jobs: list[list[Row]]) -> list[Collector]:
    """Submit all jobs while the worker is held, so they share batches."""
    out = [Collector(len(rows)) for rows in jobs]
    with engine.held():
        for rows, c in zip(jobs, out, strict=True):
            engine.submit(Job(rows, c))
    return [c.wait() for c in out]


@pytest.fixture
def engine(llama: actadd.LM) -> Any:
    e = Engine(llama).start()
    yield e
    e.close()


def ids(lm: actadd.LM, text: str) -> tuple[int, ...]:
    return tuple(lm.token_ids(text))


def test_batched_rows_equal_solo_rows(engine: Engine, llama: actadd.LM) -> None:
    lh = tuple(actadd.get_x_vector("Love", "Hate", 5, 1))
    jobs = [
        [Row(ids(llama, "I hate you because"), lh, max_tokens=12)],
        [Row(ids(llama, "Hi"), (), max_tokens=4)],
        [
            Row(
                ids(llama, "Sampled text"),
                lh,
                max_tokens=9,
                sampling=Sampling(temperature=1.0, top_p=0.8, freq_penalty=0.5),
                seed=s,
            )
            for s in (1, 2)
        ],
        [
            Row(
                ids(llama, "The weather"),
                (actadd.ActivationAddition(-3, 2, prompt="Rain"),),
                max_tokens=7,
                sampling=Sampling(temperature=0.7),
                seed=9,
            )
        ],
    ]
    together = run(engine, jobs)
    assert engine.stats["max_rows"] == 5  # the four jobs' rows ran together
    alone = [run(engine, [rows])[0] for rows in jobs]
    assert [c.texts for c in together] == [c.texts for c in alone]
    assert together[1].tokens == {0: 4}  # each row stops at its own max_tokens
    assert together[0].tokens == {0: 12}
    assert together[0].kinds[0] == "start"


def test_seeded_rows_match_the_library(engine: Engine, llama: actadd.LM) -> None:
    adds = list(actadd.get_x_vector("Love", "Hate", 5, 1))
    sampling = Sampling(temperature=1.0, top_p=0.5, freq_penalty=1.0)
    rows = [
        Row(ids(llama, "I hate you because"), tuple(adds), max_tokens=10, sampling=sampling, seed=s)
        for s in (3, 4)
    ]
    c = run(engine, [rows])[0]
    with engine.held():  # the model is ours until the block ends (no batch is running)
        df = actadd.gen_using_activation_additions(
            llama,
            adds,
            ["I hate you because"] * 2,
            tokens_to_generate=10,
            seeds=[3, 4],
            temperature=1.0,
            top_p=0.5,
            freq_penalty=1.0,
        )
    assert c.texts == list(df.completions)


def test_rows_at_different_locations_share_a_batch(engine: Engine, llama: actadd.LM) -> None:
    a = (actadd.ActivationAddition(2, 1, prompt="ab"),)
    jobs = [
        [Row(ids(llama, "Hello you"), a, location="front", max_tokens=3)],
        [Row(ids(llama, "Hello you"), a, location="back", max_tokens=3)],
        [Row(ids(llama, "Plain"), (), max_tokens=3)],
    ]
    together = run(engine, jobs)
    assert engine.stats["max_rows"] == 3
    alone = [run(engine, [rows])[0] for rows in jobs]
    assert [c.texts for c in together] == [c.texts for c in alone]
    assert together[0].texts != together[1].texts  # the two locations steer differently


def test_stop_strings_end_a_row_and_are_not_emitted(engine: Engine, llama: actadd.LM) -> None:
    full = run(engine, [[Row(ids(llama, "I hate you"), max_tokens=12)]])[0].texts[0]
    stop = full[3:5]
    c = run(engine, [[Row(ids(llama, "I hate you"), max_tokens=12, stop=(stop,))]])[0]
    assert c.texts[0] == full[: full.find(stop)] and c.reasons == {0: "stop"}


def test_a_bad_job_fails_alone(engine: Engine, llama: actadd.LM) -> None:
    good = [Row(ids(llama, "I hate you because"), max_tokens=5)]
    too_long = [Row(ids(llama, "Hi"), (actadd.ActivationAddition(1, 1, prompt="Much longer"),))]
    c_good, c_bad = run(engine, [good, too_long])
    assert isinstance(c_bad.error, actadd.PromptError)
    assert c_good.error is None and c_good.tokens == {0: 5}


class _Broken:
    """A steerable whose site does not exist: ``steer`` itself fails, for the whole batch."""

    def injections(self, lm: actadd.LM) -> list[Injection]:
        return [Injection(Site("resid_pre", 99), torch.zeros(1, lm.d_model))]

    def describe(self) -> str:
        return "broken"


def test_batch_failing_before_its_first_token_is_rerun_job_by_job(
    engine: Engine, llama: actadd.LM
) -> None:
    good = [Row(ids(llama, "I hate you because"), max_tokens=5)]
    broken = [Row(ids(llama, "Hello"), (_Broken(),), max_tokens=5)]
    c_good, c_bad = run(engine, [good, broken])
    assert c_bad.error is not None
    assert c_good.error is None and c_good.tokens == {0: 5}
    with engine.held():  # after the batch under way
        hooks = actadd_hooks(llama.model)
    assert hooks == 0


def test_cancel_stops_rows(engine: Engine, llama: actadd.LM) -> None:
    c = Collector(1)
    job = Job([Row(ids(llama, "Hi"), max_tokens=200)], c)

    def emit(ev: Event) -> None:
        c(ev)
        if ev.kind == "delta":
            job.cancel()

    job.emit = emit
    engine.submit(job)
    c.wait()
    assert c.reasons == {0: "cancelled"} and c.tokens[0] < 200


def test_closed_and_full(llama: actadd.LM) -> None:
    e = Engine(llama, max_queue_rows=2).start()
    with e.held():
        e.submit(Job([Row(ids(llama, "a"))] * 2, Collector(2)))
        with pytest.raises(QueueFull):
            e.submit(Job([Row(ids(llama, "b"))], Collector(1)))
    e.close()
    with pytest.raises(EngineClosed):
        e.submit(Job([Row(ids(llama, "c"))], Collector(1)))
