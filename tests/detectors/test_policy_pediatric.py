"""The pediatric image model is the second line: the header's age decides when it is there and plausible."""

from __future__ import annotations

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
