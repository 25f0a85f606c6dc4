"""The sampling suite's bookkeeping (diffuse_engine.testbed.bench): the per-bed figure,
the summary over beds, the exact-sample reference and per-bed SDE fields."""

from __future__ import annotations

import math

import pytest

from diffuse_engine import Engine
from diffuse_engine.testbed.bench import beds as B
from diffuse_engine.testbed.bench import suite as S


def rec(bed, w, s, c, seed=1, held=False, sde="vp", nfe=10):
    return {"bed": bed, "held_out": held, "sde": sde, "nfe_budget": nfe, "seed": seed,
            "weight_tv_ratio": w, "std_error_ratio": s, "centre_error_ratio": c,
            "worst": max(w, s, c)}  # fmt: skip


def test_bed_error_is_the_worst_of_the_means_not_the_mean_of_the_worsts():
    # two seeds whose worst metric differs: noise, not error; the means are 1.0 and 1.0
    recs = [rec("a", 1.5, 0.5, 1.0), rec("a", 0.5, 1.5, 1.0, seed=2)]
    assert S.bed_error(recs) == pytest.approx(1.0)
    assert S.bed_error([rec("a", 1, 1, 1), {**rec("a", 1, 1, 1), "worst": math.inf}]) == math.inf


def test_summary_takes_the_worst_bed_apart_for_held_out_beds():
    recs = [rec("a", 2.0, 1, 1), rec("b", 1.2, 1, 1), rec("c", 9.0, 1, 1, held=True)]
    recs.append({**rec("d", 99, 1, 1), "skipped": "refused"})  # not a measurement
    sel = S.summary({str(i): r for i, r in enumerate(recs)}, held_out=False)
    held = S.summary({str(i): r for i, r in enumerate(recs)}, held_out=True)
    assert sel[("vp", 10)] == {"worst": 2.0, "bed": "a", "seeds": 1}
    assert held[("vp", 10)]["bed"] == "c"


def test_choose_takes_the_smallest_worst_case_and_a_pilot_only_when_clearly_better():
    beds = (B.Bed("a", {}), B.Bed("b", {}))

    def cand(label, worst_a, worst_b, setup=0):
        return [
            {**rec(bed, w, 1, 1), "label": label, "solver": label, "fields": {}, "setup_nfe": setup}
            for bed, w in (("a", worst_a), ("b", worst_b))
        ]

    def pick(*cands):
        records = {f"{r['label']}/{r['bed']}": r for c in cands for r in c}
        return S.choose(records, "vp", 10, beds=beds)

    plain, other = cand("plain", 2.0, 3.0), cand("other", 3.5, 1.0)
    assert pick(plain, other) == (plain[1], 3.0)  # the minimax, not the mean
    # a fitted schedule within 5 % of the best plain one is not worth its pilot
    assert pick(plain, cand("fitted", 2.9, 2.9, setup=401))[0]["label"] == "plain"
    assert pick(plain, cand("fitted", 2.5, 2.5, setup=401))[0]["label"] == "fitted"
    # a candidate missing a bed (a pruned sweep) does not compete
    assert pick(plain, cand("fitted", 1.0, 1.0, setup=401)[:1])[0]["label"] == "plain"


def test_near_ties_are_the_pick_and_those_within_the_margin_of_it():
    beds = (B.Bed("a", {}), B.Bed("b", {}))
    recs = [
        {**rec(bed, w, 1, 1), "label": label, "solver": label, "fields": {}}
        for label, ws in (("best", (2.0, 1.0)), ("close", (1.0, 2.08)), ("far", (2.2, 1.0)))
        for bed, w in zip(("a", "b"), ws, strict=True)
    ]
    records = {f"{r['label']}/{r['bed']}": r for r in recs}
    ties = S.near_ties(records, "vp", 10, beds=beds)  # 2.08 <= 1.05 * 2.0 < 2.2
    assert [t["label"] for t in ties] == ["best", "close"]
    assert S.seed0_worst(records, ties[1], beds=beds) == 2.08  # its own worst, not the pick's
    assert [t["label"] for t in S.near_ties(records, "vp", 10, beds=beds, margin=0.2)] == [
        "best",
        "close",
        "far",
    ]
    assert [t["label"] for t in S.near_ties(records, "vp", 10, beds=beds, margin=0.2, most=2)] == [
        "best",
        "close",
    ]  # the closest only
    assert S.near_ties(records, "subvp", 10, beds=beds) == []


def test_tiebreak_reruns_the_near_ties_on_its_seeds_and_takes_the_best_there(tmp_path, monkeypatch):
    beds = (B.Bed("a", {}), B.Bed("b", {}), B.Bed("held", {}, held_out=True))
    seed0 = {"best": (2.0, 1.0), "close": (1.0, 2.05), "far": (3.0, 3.0)}
    # on the tie-break seeds the seed-0 pick is the worse one: its 2.0 was luck
    later = {"best": (2.5, 1.0), "close": (1.2, 1.4), "far": (0.1, 0.1)}
    records = {
        f"{label}/{bed}": {
            **rec(bed, w, 1, 1, seed=0),
            "label": label,
            "solver": label,
            "fields": {"order": 3},
        }  # fmt: skip
        for label, ws in seed0.items()
        for bed, w in zip(("a", "b"), ws, strict=True)
    }
    calls = []

    def fake_run(engine, bed, sde, solver, fields, nfe, seed, floors, *, label, prior):
        calls.append((bed.name, label, seed))
        assert not bed.held_out and fields == {"order": 3} and nfe == 10
        w = later[label][("a", "b").index(bed.name)] * (1.0 + 0.01 * (seed % 2))
        return {**rec(bed.name, w, 0.1, 0.1, seed=seed), "label": label, "solver": solver}

    monkeypatch.setattr(S, "run_one", fake_run)
    out = tmp_path / "tiebreak.jsonl"
    pick, figures = S.tiebreak(None, records, "vp", 10, out, beds=beds, seeds=(100, 101))
    assert pick["label"] == "close"
    assert set(figures) == {"best", "close"}  # "far" is no near tie: not rerun
    assert figures["close"] == pytest.approx(1.4 * 1.005)  # the worst bed's mean over seeds
    assert len(calls) == 2 * 2 * 2  # two ties, two selection beds, two seeds
    # resumable: a second call reads the records back instead of sampling again
    assert S.tiebreak(None, records, "vp", 10, out, beds=beds, seeds=(100, 101))[0] == pick
    assert len(calls) == 8
    # equal worst cases: the smaller mean over the beds decides
    # (within S.EQUAL = 1 %: the same worst bed, one better elsewhere, as a final step
    # that only matters on one bed)
    for i, (w_best, winner) in enumerate(((1.405, "best"), (1.45, "close"))):
        later.update(best=(w_best, 0.2), close=(1.4, 1.0))
        out2 = tmp_path / f"tiebreak{i}.jsonl"
        picked = S.tiebreak(None, records, "vp", 10, out2, beds=beds, seeds=(100, 101))[0]
        assert picked["label"] == winner
    # with nothing within the margin the seed-0 pick stands and nothing runs
    assert S.tiebreak(None, records, "vp", 10, out, beds=beds, margin=0.01)[0]["label"] == "best"
    assert len(calls) == 24


def test_choose_for_a_data_size_reads_only_the_beds_of_that_size():
    beds = (B.Bed("flat", {}), B.Bed("wide", {"layout": "random", "dim": 16}))
    assert [b.dims for b in beds] == [2, 16]
    assert B.Bed("img", {"dim": 48, "shape": [3, 4, 4]}).dims == 48
    recs = [
        {**rec(bed, w, 1, 1), "label": label, "solver": label, "fields": {}}
        for label, ws in (("lowd", (1.0, 3.0)), ("highd", (9.0, 2.0)))
        for bed, w in zip(("flat", "wide"), ws, strict=True)
    ]
    records = {f"{r['label']}/{r['bed']}": r for r in recs}
    assert S.choose(records, "vp", 10, beds=beds)[0]["label"] == "lowd"  # worst 3 vs 9
    assert S.choose(records, "vp", 10, beds=beds, min_dims=16)[0]["label"] == "highd"
    assert S.choose(records, "vp", 10, beds=beds, min_dims=17) is None  # no bed that large


def test_exact_samples_score_near_one_and_the_reference_says_so():
    bed = B.Bed("tiny", B._ring(2.0, 0.1), n=4000)
    held = B.Bed("tiny-held", B._ring(3.0, 0.2), n=4000, held_out=True)
    path_text = B.registry_text((bed, held))
    e = Engine(registry=[_write(path_text)])
    ref = S.exact_reference(e, [bed, held], seeds=range(1, 9), floors=B.Floors())
    # exact samples against the mean of 4 exact floors: each ratio's mean over 8 seeds
    # is 1 +- ~0.6/sqrt(8) (a single ratio's spread is ~0.6 for the TV-like metrics);
    # the worst of three such means stays below 1.7 unless the figure is biased
    for held_out in (False, True):
        assert 0.6 < ref[held_out][0] < 1.7, ref


def test_a_bed_can_configure_an_sde_for_its_data():
    bed = B.Bed("big", B._ring(28.0, 1.4), sde_fields={"ve": {"sigma_max": 120.0}})
    assert bed.sde_entry("ve") == "bed-big-ve" and bed.sde_entry("vp") == "vp"
    e = Engine(registry=[_write(B.registry_text((bed,)))])
    assert e.build("sde", "bed-big-ve").config.sigma_max == 120.0
    large = B.bed("scale-large")
    assert large.sde_fields["ve"]["sigma_max"] >= 2 * large.fields["radius"]  # its diameter


def _write(text: str):
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "beds.toml"
    path.write_text(text)
    return path


def test_budget_regressions_finds_a_larger_budget_that_scores_worse():
    recs = [
        {**rec("a", 3.0, 1, 1), "nfe_budget": 10},
        {**rec("a", 2.0, 1, 1), "nfe_budget": 20},
        {**rec("a", 2.5, 1, 1), "nfe_budget": 50},  # worse than at 20
        {**rec("b", 1.0, 1, 1), "nfe_budget": 10},
        {**rec("b", 1.0, 1, 1), "nfe_budget": 20},  # equal is not worse
    ]
    worse, steps = S.budget_regressions({str(i): r for i, r in enumerate(recs)})
    assert steps == 3
    assert worse == [("a", "vp", 20, 50, 2.0, 2.5)]


def test_budget_interval_tells_a_worse_budget_from_the_seeds_noise():
    """Paired by seed: a larger budget worse on every seed is worse; one whose seeds
    scatter both ways around the smaller budget's is a tie."""
    recs = [rec("a", 1, 1.0 + 0.1 * k, 1, seed=k, nfe=20) for k in range(8)]
    recs += [rec("a", 1, 1.2 + 0.1 * k, 1, seed=k, nfe=50) for k in range(8)]  # +0.2 each
    recs += [rec("b", 1, 1.0 + 0.1 * k, 1, seed=k, nfe=20) for k in range(8)]
    noise = (0.3, -0.3, 0.25, -0.25, 0.3, -0.2, 0.2, -0.28)  # mean +0.00125
    recs += [rec("b", 1, 1.0 + 0.1 * k + d, 1, seed=k, nfe=50) for k, d in enumerate(noise)]
    records = {str(i): r for i, r in enumerate(recs)}
    lo, hi = S.budget_interval(records, "a", "vp", 20, 50)
    # (m + 0.2) / m for a resampled mean m between the seeds' 1.0 and 1.7
    assert 1.9 / 1.7 - 1e-9 <= lo and hi <= 1.2 / 1.0 + 1e-9
    lo, hi = S.budget_interval(records, "b", "vp", 20, 50)
    assert lo < 1 < hi
    with pytest.raises(ValueError, match="paired records needed"):
        S.ratio_interval([], [])


def test_a_sweep_record_says_its_start_and_another_start_measures_again(tmp_path):
    bed = B.Bed("tiny", B._ring(2.0, 0.1), n=500, sdes=("vp",))
    e = Engine(registry=[_write(B.registry_text((bed,)))])
    cand = [S.Candidate("ddim", {"schedule": "quadratic"})]
    out = tmp_path / "c.jsonl"
    kw = dict(sdes=("vp",), budgets=(4,), beds=(bed,), floors=B.Floors(), log=lambda *a: None)
    S.sweep_candidates(e, cand, out, prior="sde", **kw)
    S.sweep_candidates(e, cand, out, prior="sde", **kw)  # resumed: nothing to measure
    lines = out.read_text().splitlines()
    assert len(lines) == 1 and '"prior": "sde"' in lines[0]
    got = S.sweep_candidates(e, cand, out, prior="auto", **kw)  # another start: again
    assert len(out.read_text().splitlines()) == 2
    assert [r["prior"] for r in got.values()] == ["auto"]  # the later record wins


def test_ends_name_the_final_step_and_keep_the_first_sweeps_labels():
    ends = S.parse_ends("1e-3:tweedie,1e-5:none,1e-4:flow")
    assert ends == ((1e-3, True), (1e-5, False), (1e-4, True, "flow"))
    first = S.candidates(ends=ends[:2])
    assert [c.label for c in first] == [c.label for c in S.candidates() if "0.0001" not in c.label]
    # the first sweep's records (docs/suite/candidates.jsonl) carry these labels
    assert first[0].label == "dpm_solver_pp[denoise=True,eps=0.001,order=2,schedule=logsnr]"
    assert first[1].label == "dpm_solver_pp[denoise=False,eps=1e-05,order=2,schedule=logsnr]"
    flow = S.candidates(ends=ends[2:])
    assert all(c.fields["denoise_rule"] == "flow" and c.fields["eps"] == 1e-4 for c in flow)
    with pytest.raises(ValueError, match="tweedie, flow, none"):
        S.parse_ends("1e-3:mean")


def test_solver_error_is_zero_for_the_reference_and_falls_with_the_tolerance():
    """The distance to the converged flow from the same starts: none for the reference
    itself (a deterministic solver), and smaller for a tighter tolerance."""
    bed = B.Bed("tiny", B._ring(2.0, 0.1), n=512, sdes=("vp",))
    e = Engine(registry=[_write(B.registry_text((bed,)))])
    run = lambda **f: S.solver_error(e, bed, "vp", "dpm_adaptive_ms", f, (1, 2))  # noqa: E731
    assert run(**S.CONVERGED)["error"] == 0.0
    coarse, fine = run(ntol=0.05), run(ntol=0.005)
    assert fine["error"] < 0.5 * coarse["error"]  # 10x the tolerance: well over 2x the error
    assert fine["nfe"] > coarse["nfe"] and coarse["seeds"] == [1, 2]


def test_a_results_file_mixing_two_entries_on_one_bed_is_refused():
    """Pooled by (SDE, budget, bed), two entries' seeds would score neither: the
    summary and the budget checks refuse the file instead, naming the cell."""
    recs = [{**rec("a", 1, 1, 1, seed=k), "label": "best-vp-10"} for k in (1, 2)]
    recs.append({**rec("a", 1, 1, 1, seed=3), "label": "best-vp-10-dim16"})
    records = {str(i): r for i, r in enumerate(recs)}
    for check in (
        lambda: S.summary(records, held_out=False),
        lambda: S.budget_regressions(records),
        lambda: S.budget_interval(records, "a", "vp", 10, 20),
    ):
        with pytest.raises(ValueError, match="'best-vp-10' and 'best-vp-10-dim16' on bed 'a'"):
            check()
    records.pop("2")  # one entry per cell: fine
    assert S.summary(records, held_out=False)[("vp", 10)]["seeds"] == 2
