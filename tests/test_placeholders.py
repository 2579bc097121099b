import json

from hypothesis import given
from hypothesis import strategies as st

from rollbackd.executors.placeholders import check_templates, substitute, substitute_json

VALUES = {
    "service": "checkout",
    "from_version": "v2",
    "to_version": "v1",
    "reason": 'error rate 31% > 5% "bad"\nsecond line',
    "rollback_id": "rb-1",
    "canary": "false",
}


def test_substitutes_known_placeholders_only() -> None:
    assert (
        substitute("deploy {service} {to_version} {other}", VALUES) == "deploy checkout v1 {other}"
    )


def test_json_body_keeps_its_braces_and_escapes_values() -> None:
    body = (
        '{"workflow_id": "wf", "target_version": "{to_version}", '
        '"reason": "{reason}", "force": false}'
    )
    document = json.loads(substitute_json(body, VALUES))
    assert document == {
        "workflow_id": "wf",
        "target_version": "v1",
        "reason": VALUES["reason"],
        "force": False,
    }


@given(st.text())
def test_no_reason_can_break_out_of_a_json_string(reason: str) -> None:
    body = '{"reason": "{reason}", "force": false}'
    document = json.loads(substitute_json(body, {**VALUES, "reason": reason}))
    assert document == {"reason": reason, "force": False}


def test_unknown_placeholder_is_named_with_a_hint() -> None:
    problem = check_templates(["deploy {to_versoin}", '{"a": 1}'])
    assert problem is not None
    assert "{to_versoin}" in problem
    assert "did you mean 'to_version'" in problem


def test_json_braces_are_not_placeholders() -> None:
    assert check_templates(['{"workflow_id": "x", "n": {"a": 1}}']) is None
