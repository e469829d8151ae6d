"""flowstate.py: `FlowStates` gives every new flow its state, kept out of the flow itself."""

from __future__ import annotations

import gc
import weakref

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
