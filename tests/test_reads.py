"""What each measure reads of the config (its READS, `harness.measures.reads`) and its VERSION:
every measure declares both; a record keeps only what its measure reads (and the neutral keys),
so a key it does not read makes no variant, no rerun under `resume=true` and no config
difference in `compare`; and a measure's `run` reads nothing it did not declare."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from harness import cli, worker
from harness.config import AppConfig, record_config
from harness.job import Job
from harness.measures import MEASURES, reads, version
from harness.records import (
    NEUTRAL_KEYS,
    config_hash,
    covers,
    flat,
    is_read,
    kept_config,
    make_record,
    measured_config,
    read_records,
    write_record,
)
from tests.conftest import ROOT, make_config

REF = ROOT / "results" / "reference" / "cpu-2core"


def _resolved(c: AppConfig) -> dict[str, Any]:
    plain = OmegaConf.to_container(OmegaConf.structured(c))
    assert isinstance(plain, dict)
    return plain  # type: ignore[return-value]


def _positives(r: tuple[str, ...]) -> set[str]:
    return {p for p in r if not p.startswith("-")}


KEYS = set(flat(_resolved(make_config())))


@pytest.mark.parametrize("name", list(MEASURES))
def test_every_measure_declares_what_it_reads_and_its_version(name: str) -> None:
    """The registry's rule: READS (a tuple of dotted prefixes of config keys, "-prefix" an
    exception under one of them) and VERSION (an int from 1) in every measure's module. Every
    job reads the framework section; a measure reads its own section and no other measure's."""
    module = MEASURES[name]
    declared = getattr(module, "READS", None)
    assert isinstance(declared, tuple) and declared and all(isinstance(p, str) for p in declared), (
        f"{name}: declares no READS (the config keys its run reads)")
    v = getattr(module, "VERSION", None)
    assert isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{name}: VERSION must be an int >= 1, got {v!r}"
    assert version(name) == v
    for p in declared:
        assert any(covers(p.lstrip("-"), k) for k in KEYS), f"{name}: {p!r} names no config key"
        if p.startswith("-"):
            assert any(covers(q, p[1:]) for q in _positives(declared)), f"{name}: {p!r} excepts nothing it reads"
    assert "framework" in declared and f"measure.{name}" in declared
    assert not [p for p in _positives(declared) if p.startswith("measure.") and p != f"measure.{name}"]


@pytest.mark.parametrize("name", list(MEASURES))
def test_reads_under_a_config_narrow_the_declaration(name: str) -> None:
    """A measure's `reads(config)` (where its reads depend on its config) reads no key outside
    its READS, whatever the flags."""
    flips = [{}, {"gaps": {"trained": False}}, {"snr": {"trained": False}}, {"convergence": {"seeds": [1, 2]}},
             {"conformance": {"plant": "lr", "plant_framework": "jax"}}]
    for flip in flips:
        cfg = _resolved(make_config(measure=flip))
        got = reads(name, cfg)
        assert got is not None and _positives(got) <= _positives(MEASURES[name].READS), (name, flip, got)


def test_matching_is_by_whole_dotted_parts() -> None:
    assert covers("data", "data.batch_size") and covers("data.batch_size", "data.batch_size")
    assert not covers("data", "database") and not covers("measure.snr.trained", "measure.snr.trained_ks")
    r = ("framework", "-framework.precision", "data", "-data.batch_size")
    assert is_read("framework.threads", r) and not is_read("framework.precision", r)
    assert is_read("data.source", r) and not is_read("data.batch_size", r) and not is_read("model.hidden", r)


def test_an_identity_record_keeps_only_what_identity_reads() -> None:
    """identity builds its own linear-Gaussian model from `measure.identity` (float64 always): its
    record holds no model, data, optim, framework.precision or other measure's section."""
    kept = flat(record_config(_resolved(make_config(measure={"names": ["identity", "gradflow"]})), "identity"))
    assert {k for k in kept if not k.startswith(("framework.", "measure.identity."))} == {
        "seed", "out_dir", "progress", "resume", "parallel_throughput", "measure.names"}
    assert "framework.precision" not in kept and "framework.threads" in kept
    assert {k.removeprefix("measure.identity.") for k in kept if k.startswith("measure.identity.")} == {
        f.name for f in dataclasses.fields(MEASURES["identity"].Config)}
    # a measure that reads the configured model and data keeps them (less data keys its source never reads)
    grad = flat(record_config(_resolved(make_config()), "gradflow"))
    assert "model.hidden" in grad and "data.batch_size" in grad and "optim.lr" in grad and "data.n_train" not in grad
    assert not [k for k in grad if k.startswith("measure.") and not k.startswith("measure.gradflow.") and k != "measure.names"]
    # without a measure: the whole config, as before (its data keys checked)
    assert "model.hidden" in flat(record_config(_resolved(make_config())))


def test_what_is_read_can_depend_on_the_measure_s_own_flags() -> None:
    """gaps and snr without their trained part read no model/data/optim (gaps' linear part still
    batches by data.batch_size) and none of the trained part's settings; convergence given its
    seeds does not read the top-level seed unless synthetic data is drawn from it; conformance
    reads plant_framework only when something is planted."""
    off = _resolved(make_config(measure={"gaps": {"trained": False}, "snr": {"trained": False}}))
    g, s = flat(record_config(off, "gaps")), flat(record_config(off, "snr"))
    assert not [k for k in (*g, *s) if k.startswith(("model.", "optim."))]
    assert [k for k in g if k.startswith("data.")] == ["data.batch_size"] and not [k for k in s if k.startswith("data.")]
    assert "measure.gaps.iwae_k" not in g and "measure.gaps.local_max_iter" in g and "measure.gaps.trained" in g
    assert "measure.snr.trained_ks" not in s and "measure.snr.ks" in s
    on = _resolved(make_config())
    assert "model.hidden" in flat(record_config(on, "gaps")) and "measure.snr.trained_ks" in flat(record_config(on, "snr"))
    seeds = _resolved(make_config(measure={"convergence": {"seeds": [1, 2]}}))
    assert "seed" not in flat(record_config(seeds, "convergence")) and "seed" in flat(record_config(on, "convergence"))
    synth = _resolved(make_config(measure={"convergence": {"seeds": [1, 2]}}, data={"source": "synthetic"},
                                  model={"kind": "linear", "likelihood": "gaussian"}))
    assert "seed" in flat(record_config(synth, "convergence"))
    assert "measure.conformance.plant_framework" not in flat(record_config(on, "conformance"))
    planted = _resolved(make_config(measure={"conformance": {"plant": "lr", "plant_framework": "jax"}}))
    assert flat(record_config(planted, "conformance"))["measure.conformance.plant_framework"] == "jax"


def test_an_identity_record_of_any_age_differs_only_in_what_identity_reads() -> None:
    """Records from before READS hold the whole config: the current declaration applies to
    them too, so two identity records whose model.hidden (or data, optim, another measure's
    section) differ measured the same thing: same measured config, same hash."""
    rec = next(r for r in read_records(REF) if r["measure"] == "identity")
    assert "model" in rec["config"] and "measure_version" not in rec  # written before READS and versions
    other = copy.deepcopy(rec)
    other["config"]["model"]["hidden"] = [7, 7]
    other["config"]["data"]["batch_size"] = 3
    other["config"]["optim"]["lr"] = 0.5
    other["config"]["measure"]["gradflow"]["train_steps"] = 1
    assert measured_config(other) == measured_config(rec) and config_hash(other) == config_hash(rec)
    assert not [k for k in measured_config(rec) if k.startswith(("model.", "data.", "optim.", "measure.gradflow."))]
    assert not set(measured_config(rec)) & set(NEUTRAL_KEYS)
    # a new record (only the keys read) has the same measured config as the old one of that config
    new = {**rec, "config": kept_config("identity", rec["config"])}
    assert measured_config(new) == measured_config(rec) and config_hash(new) == config_hash(rec)
    # what identity reads tells records apart, and so does the measure's version
    seeded = copy.deepcopy(rec)
    seeded["config"]["seed"] = rec["config"]["seed"] + 1
    assert config_hash(seeded) != config_hash(rec)
    assert config_hash({**rec, "measure_version": 2}) != config_hash(rec)
    assert config_hash({**rec, "measure_version": 1}) == config_hash(rec)  # absent means 1


def test_a_measure_that_declares_nothing_keeps_the_old_rule() -> None:
    """An unregistered measure (or one without READS): every key but the neutral ones and other
    measures' sections, and its record keeps the whole config."""
    cfg = _resolved(make_config())
    assert reads("no-such-measure", cfg) is None and kept_config("no-such-measure", cfg) == cfg
    mc = measured_config({"measure": "no-such-measure", "config": cfg})
    assert "model.hidden" in mc and "out_dir" not in mc and not [k for k in mc if k.startswith("measure.")]


def _ref(framework: str) -> dict[str, Any]:
    return next(r for r in read_records(REF) if r["measure"] == "identity" and r["framework"] == framework)


def test_resume_reruns_nothing_when_only_an_unread_key_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """An `ok` identity record under out_dir, then `resume=true` with another model, data batch
    size and learning rate (none of which identity reads): nothing reruns. A key identity reads
    (its own section), or a new VERSION of the measure, reruns it."""
    out, ref = tmp_path / "runs", _ref("torch")

    def config(**kw: Any) -> AppConfig:
        return make_config(measure={"names": ["identity"], **kw.pop("measure", {})}, framework={"name": "torch"},
                           out_dir=str(out), resume=True, **kw)

    first = config(model={"hidden": [128]})
    write_record(out / "first" / "identity-torch-eager-float64.json",
                 make_record(run_id="first", measure="identity", framework="torch", mode="eager", status="ok",
                             config=record_config(_resolved(first), "identity"), env=ref["env"], metrics=ref["metrics"]))
    ran: list[Job] = []

    def run_job(job: Job, c: AppConfig, jobs_dir: Path, lock: int) -> dict[str, Any]:  # a stand-in worker
        ran.append(job)
        rec = make_record(run_id=job.run_id, measure=job.measure, framework=job.framework, mode=job.mode, status="ok",
                          config=job.config, env=ref["env"], metrics=ref["metrics"])
        write_record(Path(job.record_path), rec)
        return rec

    monkeypatch.setattr(worker, "run_job", run_job)
    unread = config(model={"hidden": [32, 16]}, data={"batch_size": 32}, optim={"lr": 0.1})
    assert cli.run_suite(unread, _resolved(unread), out / "again") == 0
    assert ran == [] and "resume: skipped 1 of 1 jobs" in capsys.readouterr().out
    adopted = read_records(out / "again")
    assert len(adopted) == 1 and adopted[0]["run_id"] == "first"
    read = config(measure={"identity": {"mc_samples": 100}})
    assert cli.run_suite(read, _resolved(read), out / "third") == 0
    assert len(ran) == 1 and "resume: skipped 0 of 1 jobs" in capsys.readouterr().out
    assert "model" not in ran[0].config and ran[0].config["measure"]["identity"]["mc_samples"] == 100
    monkeypatch.setattr(MEASURES["identity"], "VERSION", version("identity") + 1)
    assert cli.run_suite(unread, _resolved(unread), out / "fourth") == 0
    assert len(ran) == 2 and read_records(out / "fourth")[0]["measure_version"] == version("identity")


# --- a measure's run reads nothing it did not declare -------------------------------------------

#: keys a measure's run touches that cannot change what it measures, and why (beyond its READS)
HARMLESS: dict[str, dict[str, str]] = {
    "identity": {"optim": "the backend's optimizer is built (from optim.*) and never stepped"},
    "snr": {"optim": "the toy's backend optimizer is built and never stepped"},
    "throughput": {"data.batch_size": "common.dataset takes data.* whole and drops batch_size"},
    "conformance": {"data.batch_size": "common.dataset takes data.* whole and drops batch_size",
                    "optim.name": "replaced by SGD and Adam", "optim.lr": "replaced by sgd_lr and adam_lr",
                    "optim.momentum": "replaced by 0", "measure.conformance.plant_framework": "read, unused unless planted",
                    "framework.precision": "read to see whether it names a mixed precision, which then chooses the "
                                           "dtype and is declared (`conformance.reads`); else unused"},
}


def _tracked(obj: Any, prefix: str, seen: set[str]) -> None:
    """Make `obj` (a config dataclass) record every field read of it as `prefix` + name in
    `seen`; its sections (dataclasses) are tracked under their own prefix, not recorded."""
    cls = type(obj)
    names = {f.name for f in dataclasses.fields(cls)}

    def __getattribute__(self: Any, name: str) -> Any:
        value = object.__getattribute__(self, name)
        if name in names and not (dataclasses.is_dataclass(value) and not isinstance(value, type)):
            seen.add(prefix + name)
        return value

    obj.__class__ = type(f"Tracked{cls.__name__}", (cls,), {"__getattribute__": __getattribute__})
    for name in names:
        value = object.__getattribute__(obj, name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            _tracked(value, f"{prefix}{name}.", seen)


#: small settings per measure (a few seconds each, torch, eager)
SMALL: dict[str, dict[str, Any]] = {
    "identity": {"mc_samples": 20, "iwae_ks": [1, 10]},
    "gradflow": {"train_steps": 2, "log_every": 1, "fd_directions": 1},
    "conformance": {"steps": 2, "dtypes": ["float64"]},
    "convergence": {"epochs": 1, "iwae_k": 10, "elbo_samples": 2},
    "throughput": {"batch_sizes": [4], "repeats": 2, "steps": 1, "warmup": 0, "matmul_n": 16, "matmul_repeats": 1,
                   "plain": False},
    "gaps": {"n_examples": 4, "n_train": 40, "train_steps": 2, "epochs": 1, "n_test": 3, "iwae_k": 10,
             "elbo_samples": 4, "local_samples": 2, "local_max_iter": 3},
    "snr": {"ks": [1, 3], "draws": 8, "samples": 0, "dim": 3, "groups": 4, "trained_epochs": 1, "trained_ks": [1, 3],
            "trained_draws": 8, "trained_points": 1},
}


@pytest.mark.slow
@pytest.mark.parametrize("trained", [True, False], ids=["trained", "untrained"])
@pytest.mark.parametrize("name", list(MEASURES))
def test_run_reads_nothing_it_did_not_declare(name: str, trained: bool, tmp_path: Path) -> None:
    """The measure's run (torch, in this process, small settings) on a config that records each
    key read: every key read is declared (or HARMLESS, with the reason), and every prefix it
    declares is read. A job gets only what its measure declares, so a key read but not declared
    would silently take the schema's default."""
    if not trained and name not in ("gaps", "snr"):
        pytest.skip("only gaps and snr have a trained part to switch off")
    section = {**SMALL.get(name, {}), **({"trained": trained} if name in ("gaps", "snr") else {})}
    c = make_config(measure={"names": [name], name: section}, framework={"name": "torch"},
                    model={"hidden": [8], "latent": 2}, data={"batch_size": 256}, out_dir=str(tmp_path))
    declared = reads(name, _resolved(c))
    assert declared is not None
    seen: set[str] = set()
    _tracked(c, "", seen)
    res = MEASURES[name].run(c, Job("r", name, "torch", "eager", {}, str(tmp_path / f"{name}.json")))
    assert res.status == "ok", res.error
    harmless = HARMLESS.get(name, {})
    undeclared = sorted(k for k in seen if k not in NEUTRAL_KEYS and not is_read(k, declared)
                        and not any(covers(h, k) for h in harmless))
    assert not undeclared, f"{name} reads {undeclared} without declaring them in READS"
    unused = sorted(p for p in _positives(declared) if not any(covers(p, k) or covers(k, p) for k in seen))
    assert not unused, f"{name} declares {unused} but its run reads none of it"
