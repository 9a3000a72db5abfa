"""The pediatric image model is the second line: the header's age decides when it is there and plausible."""

from __future__ import annotations

import numpy as np

from filmgate.config import PolicyConfig
from filmgate.manifest import Finding
from filmgate.policy import Metadata, decide


def child_finding(score: float = 0.97) -> Finding:
    return Finding("pediatric", "pediatric", score, 0.5, score >= 0.5, "child", {"adult": 1 - score, "child": score})


def test_model_decides_when_the_header_has_no_age():
    d = decide([child_finding()], Metadata(modality="DX"), PolicyConfig())
    assert d.reasons == ("pediatric",)
    d = decide([child_finding()], Metadata(is_dicom=False), PolicyConfig())
    assert d.reasons == ("pediatric",)
    d = decide([child_finding()], None, PolicyConfig())
    assert d.reasons == ("pediatric",)


def test_header_age_overrules_the_model_both_ways():
    adult = decide([child_finding()], Metadata(modality="DX", patient_age="045Y"), PolicyConfig())
    assert adult.outcome == "accept" and "pediatric" in adult.notes
    assert adult.scores["pediatric"] > 0.9  # the model's score is still reported
    child = decide([child_finding(0.01)], Metadata(modality="DX", patient_age="004Y"), PolicyConfig())
    assert child.reasons == ("pediatric",)


def test_implausible_age_counts_as_missing():
    d = decide([child_finding()], Metadata(modality="DX", birth_date="19000101", study_date="20240102"), PolicyConfig())
    assert d.reasons == ("pediatric",)  # 124 years: not believed, the model decides


def test_other_detectors_are_untouched_by_the_age():
    flip = Finding("flip", "flipped", 0.99, 0.5, True, "flipped")
    d = decide([flip, child_finding()], Metadata(modality="DX", patient_age="045Y"), PolicyConfig())
    assert d.reasons == ("flipped",)


def test_without_the_age_rule_the_model_always_decides():
    d = decide([child_finding()], Metadata(modality="DX", patient_age="045Y"), PolicyConfig(pediatric_rule=False))
    assert d.reasons == ("pediatric",)


# ---- the age model (manifest kind "age"): its score is an age in years, cut at the policy's pediatric_age_years


def age_finding(years: float, manifest_cut: float = 10.0) -> Finding:
    return Finding("pediatric", "pediatric", years, manifest_cut, years < manifest_cut, below=True)


def test_an_age_estimate_is_cut_where_the_header_age_is():
    """The policy's one cut (pediatric_age_years) applies to the image's age as to the header's, whatever cut the
    manifest was written with; a film is flagged when the estimate is *under* it."""
    for years, cut, flagged in ((3.2, 10.0, True), (10.0, 10.0, False), (11.5, 10.0, False), (11.5, 12.0, True),
                                (17.0, 18.0, True), (45.0, 18.0, False)):  # fmt: skip
        policy = PolicyConfig(pediatric_age_years=cut)
        d = decide([age_finding(years, manifest_cut=10.0)], Metadata(modality="DX"), policy)
        assert (d.reasons == ("pediatric",)) is flagged, (years, cut, d.reasons)
        (f,) = d.findings
        assert f.threshold == cut and f.flagged is flagged and f.score == years
        assert f.to_dict()["flagged_when"] == "score < threshold"
    # header age "012Y" and an image estimate of 12.0 agree at every cut
    for cut in (10.0, 12.5, 18.0):
        policy = PolicyConfig(pediatric_age_years=cut, pediatric_rule=False)
        by_image = decide([age_finding(12.0)], Metadata(modality="DX"), policy).reasons
        header = Metadata(modality="DX", patient_age="012Y")
        by_header = decide([], header, PolicyConfig(pediatric_age_years=cut)).reasons
        assert by_image == by_header == (("pediatric",) if cut > 12.0 else ()), cut


def test_the_header_age_overrules_an_age_estimate_both_ways():
    adult = decide([age_finding(4.0)], Metadata(modality="DX", patient_age="045Y"), PolicyConfig())
    assert adult.outcome == "accept" and "pediatric" in adult.notes and adult.scores["pediatric"] == 4.0
    child = decide([age_finding(40.0)], Metadata(modality="DX", patient_age="004Y"), PolicyConfig())
    assert child.reasons == ("pediatric",)


def test_a_configured_threshold_still_overrides_an_age_detectors_cut():
    d = decide([age_finding(8.0)], Metadata(modality="DX"), PolicyConfig(thresholds={"pediatric": 6.0}))
    assert d.outcome == "accept" and d.findings[0].threshold == 6.0


def test_an_age_manifest_reads_its_output_as_years():
    from filmgate.manifest import ModelManifest
    from filmgate.preprocess import PreprocessSpec

    m = ModelManifest(name="pediatric", version="2", file="model.onnx", kind="age", reason="pediatric",
                      threshold=10.0, preprocessing=PreprocessSpec())  # fmt: skip
    found = m.findings(np.array([[3.5], [10.0], [42.0]], dtype=np.float32))
    assert [f.score for f in found] == [3.5, 10.0, 42.0] and [f.flagged for f in found] == [True, False, False]
    assert all(f.below for f in found)
    assert m.flagged(m.scores(np.array([[3.5], [42.0]]))).tolist() == [True, False]
    back = ModelManifest.from_dict(m.to_dict())
    assert (back.kind, back.threshold, back.labels) == ("age", 10.0, ())
