"""flow/state.py: `FlowStates` gives every new flow its state, kept out of the flow itself; each field is
written only by the modules its comment names."""

from __future__ import annotations

import ast
import dataclasses
import gc
import re
import weakref
from pathlib import Path

import regproxy
from hooks.conftest import request_flow
from mitmproxy import http
from mitmproxy.test import taddons, tflow
from regproxy.flow import state as flowstate
from regproxy.flow.state import FlowState, FlowStates


def test_a_new_flow_gets_a_fresh_state() -> None:
    addon = FlowStates()
    with taddons.context(addon):
        f = request_flow("/v2/")
        addon.requestheaders(f)
    st = flowstate.of(f)
    assert isinstance(st, FlowState)
    assert (st.kind, st.log_path, st.token, st.route, st.upstream_auth) == ("local", "-", "-", None, None)
    assert not st.streamed and not st.timed_out and st.bytes_streamed == 0


def test_each_flow_has_its_own_state() -> None:
    addon = FlowStates()
    with taddons.context(addon):
        a, b = request_flow("/v2/"), request_flow("/v2/")
        addon.requestheaders(a)
        addon.requestheaders(b)
    assert flowstate.of(a) is not flowstate.of(b)


def test_the_state_is_not_in_the_flow() -> None:
    addon = FlowStates()
    with taddons.context(addon):
        f = request_flow("/v2/")
        addon.requestheaders(f)
    assert not any(isinstance(v, FlowState) for v in vars(f).values())
    assert "FlowState" not in repr(f.get_state())


def test_a_flow_never_taken_has_no_state() -> None:
    assert flowstate.of(request_flow("/v2/")) is None


def test_a_flow_with_a_response_gets_no_state() -> None:
    addon = FlowStates()
    with taddons.context(addon):
        f = request_flow("/v2/")
        f.response = http.Response.make(200)
        addon.requestheaders(f)
    assert flowstate.of(f) is None


def test_a_failed_flow_gets_no_state() -> None:
    addon = FlowStates()
    with taddons.context(addon):
        f: http.HTTPFlow = tflow.tflow(err=True)
        addon.requestheaders(f)
    assert flowstate.of(f) is None


def test_a_flow_no_longer_live_gets_no_state() -> None:
    addon = FlowStates()
    with taddons.context(addon):
        f = request_flow("/v2/")
        f.live = False
        addon.requestheaders(f)
    assert flowstate.of(f) is None


def test_in_flight_lists_live_states_and_drops_flows_that_are_gone() -> None:
    addon = FlowStates()
    with taddons.context(addon):
        kept, dropped = request_flow("/v2/"), request_flow("/v2/")
        addon.requestheaders(kept)
        addon.requestheaders(dropped)
    gc.collect()
    before = len(flowstate.in_flight())
    assert kept in flowstate.in_flight() and dropped in flowstate.in_flight()
    gone = weakref.ref(dropped)
    del dropped
    gc.collect()
    assert gone() is None
    assert len(flowstate.in_flight()) == before - 1 and kept in flowstate.in_flight()


# --- who writes what ------------------------------------------------------------------------

ADDON = Path(regproxy.__file__).parent
FIELDS = frozenset(f.name for f in dataclasses.fields(FlowState))
_WRITTEN_BY = re.compile(r"\s*# Written by ([a-z_]+(?:(?:, | and )[a-z_]+)*)[:.]")
_MUTATORS = frozenset({"append", "clear", "extend", "pop", "popitem", "remove", "setdefault", "update"})


def module_of(path: Path) -> str:
    return ".".join(path.relative_to(ADDON).with_suffix("").parts)


def declared_writers() -> dict[str, set[str]]:
    """Each field's writers as state.py names them: the nearest `# Written by` comment above the field."""
    path = Path(flowstate.__file__)
    lines = path.read_text().splitlines()
    cls = next(n for n in ast.parse("\n".join(lines)).body if isinstance(n, ast.ClassDef) and n.name == "FlowState")
    modules: dict[str, list[str]] = {}
    for p in ADDON.rglob("*.py"):
        modules.setdefault(p.stem, []).append(module_of(p))
    declared: dict[str, set[str]] = {}
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above = (_WRITTEN_BY.match(line) for line in reversed(lines[cls.lineno : node.lineno - 1]))
        found = next((m for m in above if m is not None), None)
        assert found is not None, f"FlowState.{node.target.id}: no `# Written by` comment above it"
        names = set(re.split(r", | and ", found[1])) - {"nobody"}
        for name in names:
            assert len(modules.get(name, [])) == 1, f"FlowState.{node.target.id}: {name!r} names no one module"
        declared[node.target.id] = {modules[name][0] for name in names}
    return declared


def _written_fields(node: ast.AST) -> list[str]:
    """The FlowState fields a statement writes: `st.f = …` (also in tuples, `+=`), `st.f[k] = …`, `del st.f…`,
    `st.f.update(…)` and friends, `setattr(st, "f", …)`; not `self.f` (another class's own attribute)."""

    def field_of(target: ast.AST) -> list[str]:
        if isinstance(target, ast.Tuple | ast.List | ast.Starred):
            elts = target.elts if not isinstance(target, ast.Starred) else [target.value]
            return [f for e in elts for f in field_of(e)]
        if isinstance(target, ast.Subscript):
            target = target.value
        is_self = isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self"
        return [target.attr] if isinstance(target, ast.Attribute) and target.attr in FIELDS and not is_self else []

    match node:
        case ast.Assign(targets=targets):
            return [f for t in targets for f in field_of(t)]
        case ast.AugAssign(target=target) | ast.AnnAssign(target=target):
            return field_of(target)
        case ast.Delete(targets=targets):
            return [f for t in targets for f in field_of(t)]
        case ast.Call(func=ast.Attribute(value=ast.Attribute() as owner, attr=method)) if method in _MUTATORS:
            return field_of(owner)
        case ast.Call(func=ast.Name(id="setattr"), args=[_, ast.Constant(value=str(name)), *_]) if name in FIELDS:
            return [name]
    return []


def actual_writers() -> dict[str, set[str]]:
    """Each field's writers as the addon's source has them."""
    writers: dict[str, set[str]] = {name: set() for name in FIELDS}
    for path in sorted(ADDON.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for name in _written_fields(node):
                writers[name].add(module_of(path))
    return writers


def test_every_field_is_written_only_by_the_modules_its_comment_names() -> None:
    declared, actual = declared_writers(), actual_writers()
    assert set(declared) == FIELDS
    wrong = {f: (sorted(declared[f]), sorted(actual[f])) for f in sorted(FIELDS) if declared[f] != actual[f]}
    assert not wrong, f"field: (declared, actual) writers differ: {wrong}"


def test_what_a_local_answer_says_has_one_writer() -> None:
    actual = actual_writers()
    assert actual["token_refusal"] == {"flow.answers"}
    assert "flow.answers" in actual["kind"] and "flow.answers" in actual["token"]
    assert "steps.limits" not in set().union(*actual.values())  # limits answers through answers.answer_locally


def test_the_writer_scan_sees_every_form_of_write() -> None:
    source = """
st.token = "a"
st.kind, st.log_path = "token", "/token"
st.bytes_streamed += 1
st.page["n"] = "1"
st.page.update({})
setattr(st, "base", "x")
del st.match
self.route = None
other.unrelated = 1
"""
    found = sorted(f for node in ast.walk(ast.parse(source)) for f in _written_fields(node))
    assert found == sorted(["token", "kind", "log_path", "bytes_streamed", "page", "page", "base", "match"])
