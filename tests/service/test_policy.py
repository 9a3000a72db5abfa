"""The pure decision function: thresholds, metadata rules and their switches, stable reason names."""

from __future__ import annotations

import pytest

from filmgate.config import PolicyConfig
from filmgate.manifest import Finding
from filmgate.policy import Metadata, age_in_years, decide, parse_age

ADULT_DX = Metadata(modality="DX", patient_age="045Y")


def f(detector: str, reason: str, score: float, threshold: float = 0.5, predicted: str | None = None) -> Finding:
    return Finding(detector, reason, score, threshold, score >= threshold, predicted)


def test_clean_film_is_accepted():
    d = decide([f("orientation", "rotated", 0.1), f("inversion", "inverted", 0.2)], ADULT_DX, PolicyConfig())
    assert d.outcome == "accept" and d.reasons == () and d.scores == {"orientation": 0.1, "inversion": 0.2}


def test_flagged_detectors_give_their_manifest_reason_in_stable_order():
    findings = [f("inversion", "inverted", 0.9), f("orientation", "rotated", 0.8)]
    d = decide(findings, ADULT_DX, PolicyConfig())
    assert d.outcome == "quarantine" and d.reasons == ("rotated", "inverted")


def test_a_new_detector_plugs_in_through_its_reason():
    d = decide([f("view", "not-frontal-chest", 0.7, predicted="lateral-chest")], ADULT_DX, PolicyConfig())
    assert d.reasons == ("not-frontal-chest",)
    assert d.to_dict()["findings"][0]["predicted"] == "lateral-chest"


def test_config_threshold_overrides_the_manifest():
    finding = [f("orientation", "rotated", 0.6, threshold=0.5)]
    assert decide(finding, ADULT_DX, PolicyConfig()).reasons == ("rotated",)
    d = decide(finding, ADULT_DX, PolicyConfig(thresholds={"orientation": 0.7}))
    assert d.outcome == "accept" and d.findings[0].threshold == 0.7 and not d.findings[0].flagged


def test_modality_rule_and_its_switch():
    ct = Metadata(modality="CT", patient_age="045Y")
    assert decide([], ct, PolicyConfig()).reasons == ("modality",)
    assert decide([], ct, PolicyConfig(modality_rule=False)).outcome == "accept"
    assert decide([], ct, PolicyConfig(modalities=("CR", "DX", "CT"))).outcome == "accept"
    assert decide([], Metadata(modality=None), PolicyConfig()).reasons == ("modality",)


@pytest.mark.parametrize(
    "meta,pediatric",
    [
        (Metadata(modality="CR", patient_age="009Y"), True),
        (Metadata(modality="CR", patient_age="010Y"), False),
        (Metadata(modality="CR", patient_age="018M"), True),
        (Metadata(modality="CR", patient_age="030W"), True),
        (Metadata(modality="CR", birth_date="20150601", study_date="20240102"), True),
        (Metadata(modality="CR", birth_date="19800101", study_date="20240102"), False),
        (Metadata(modality="CR", birth_date="20150601"), False),  # no study date: age unknown, no rule
        (Metadata(modality="CR", patient_age="garbage"), False),
    ],
)
def test_pediatric_rule(meta, pediatric):
    assert ("pediatric" in decide([], meta, PolicyConfig()).reasons) is pediatric


def test_pediatric_rule_switch_and_age():
    child = Metadata(modality="DX", patient_age="004Y")
    assert decide([], child, PolicyConfig(pediatric_rule=False)).outcome == "accept"
    assert decide([], child, PolicyConfig(pediatric_age_years=3)).outcome == "accept"
    assert parse_age("006M") == pytest.approx(0.5)
    assert age_in_years(Metadata(birth_date="20000101", study_date="20100101")) == pytest.approx(10.0, abs=0.01)


def test_undecodable_and_images_without_metadata():
    d = decide([], Metadata(modality="DX", decode_error="pixel data cannot be decoded"), PolicyConfig())
    assert d.reasons == ("undecodable",) and d.notes["error"].startswith("pixel data")
    # A PNG has no DICOM header: only the image detectors decide.
    assert decide([f("orientation", "rotated", 0.1)], None, PolicyConfig()).outcome == "accept"


def test_reasons_are_not_repeated():
    child = Metadata(modality="DX", patient_age="004Y")
    d = decide([f("pediatric", "pediatric", 0.9)], child, PolicyConfig())
    assert d.reasons == ("pediatric",)


def test_header_facts_come_first_and_the_order_is_configurable():
    """A CT slice that the chest detectors call rotated is quarantined first for its modality (names its folder)."""
    ct = Metadata(modality="CT")
    findings = [f("orientation", "rotated", 0.9), f("view", "not-frontal-chest", 0.9), f("novel", "smudged", 0.9)]
    assert decide(findings, ct, PolicyConfig()).reasons == ("modality", "rotated", "not-frontal-chest", "smudged")
    site = PolicyConfig(reason_order=("not-frontal-chest", "modality", "rotated"))
    assert decide(findings, ct, site).reasons == ("not-frontal-chest", "modality", "rotated", "smudged")


def test_reason_order_naming_a_reason_twice_is_a_config_error():
    from filmgate.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="policy.reason_order"):
        parse_config({"policy": {"reason_order": ["rotated", "rotated"]}})


def test_not_frontal_chest_outranks_the_chest_only_detector_reasons():
    """A knee film is quarantined as not-frontal-chest, not also as flipped/pediatric/atypical by chest detectors;
    their scores stay, each with a note. rotated stays (a sender can correct it), and so does the header's age."""
    knee = Metadata(modality="DX")
    findings = [
        f("orientation", "rotated", 0.9),
        f("flip", "flipped", 0.9),
        f("view", "not-frontal-chest", 0.9),
        f("pediatric", "pediatric", 0.9),
        f("atypical", "atypical", 0.9),
    ]
    d = decide(findings, knee, PolicyConfig())
    assert d.reasons == ("rotated", "not-frontal-chest")
    assert set(d.notes) == {"flipped", "pediatric", "atypical"}
    assert d.scores["flip"] == pytest.approx(0.9) and d.findings[1].flagged
    child_knee = Metadata(modality="DX", patient_age="006Y")
    assert decide(findings, child_knee, PolicyConfig()).reasons == ("rotated", "not-frontal-chest", "pediatric")
    # a frontal chest film keeps every reason; and a site may switch the rule off
    frontal = [x for x in findings if x.detector != "view"]
    assert decide(frontal, knee, PolicyConfig()).reasons == ("rotated", "flipped", "pediatric", "atypical")
    assert len(decide(findings, knee, PolicyConfig(outranks={})).reasons) == 5


def test_a_reason_outranking_itself_is_a_config_error():
    from filmgate.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="policy.outranks.atypical"):
        parse_config({"policy": {"outranks": {"atypical": ["atypical"]}}})
    cfg = parse_config({"policy": {"outranks": {"not-frontal-chest": ["flipped"]}}})
    assert cfg.policy.outranks["not-frontal-chest"] == ("flipped",)


def test_known_reasons_are_the_rules_and_the_detectors_in_policy_order():
    from filmgate.policy import known_reasons

    assert known_reasons(PolicyConfig(), ["rotated", "smudged", "not-frontal-chest"]) == (
        "undecodable", "detector-error", "modality", "rotated", "not-frontal-chest", "pediatric", "smudged",
    )  # fmt: skip
