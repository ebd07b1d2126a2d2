"""The model's dataclasses built by model._quick_init behave as dataclass's own __init__ would.
(Backend is packed bytes, not a dataclass: tests/test_model_backend.py; ServiceKey a tuple:
tests/test_model_service_key.py.)"""

from __future__ import annotations

import dataclasses
import inspect
import pickle

import pytest

from kpr.model import Backend, Frontend, FrontendType, Protocol, Service, ServiceKey

# Arguments for every field, none of them equal to its default.
FULL = {
    Frontend: dict(
        type=FrontendType.NODE_PORT, address="10.96.0.1", port=30080, protocol=Protocol.UDP,
        backends=(Backend("10.0.0.1", 80),), port_name="dns", external_local=True, internal_local=True,
        affinity_timeout=30, source_ranges=("10.0.0.0/8",), health_check_node_port=31000,
    ),
    Service: dict(
        key=ServiceKey("ns", "svc"), frontends=(), labels=(("a", "b"),), annotations=(("c", "d"),), source_kind="Pod",
    ),
}


@pytest.mark.parametrize("cls", list(FULL), ids=lambda c: c.__name__)
def test_fields_in_order_by_position_and_keyword(cls):
    kwargs = FULL[cls]
    by_keyword = cls(**kwargs)
    by_position = cls(*kwargs.values())
    for obj in (by_keyword, by_position):
        assert {f.name: getattr(obj, f.name) for f in dataclasses.fields(cls)} == kwargs
    assert by_keyword == by_position and hash(by_keyword) == hash(by_position)
    assert list(inspect.signature(cls).parameters) == [f.name for f in dataclasses.fields(cls)]


@pytest.mark.parametrize("cls", list(FULL), ids=lambda c: c.__name__)
def test_defaults_frozen_replace_pickle(cls):
    required = {f.name: v for f, v in zip(dataclasses.fields(cls), FULL[cls].values()) if f.default is dataclasses.MISSING}
    obj = cls(**required)
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            assert getattr(obj, f.name) == f.default, f.name
    with pytest.raises(TypeError):
        cls()  # the required fields are required
    with pytest.raises(TypeError):
        cls(**FULL[cls], unknown=1)
    name = dataclasses.fields(cls)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, name, FULL[cls][name])
    full = cls(**FULL[cls])
    assert dataclasses.replace(obj, **FULL[cls]) == full
    assert pickle.loads(pickle.dumps(full)) == full
    assert not hasattr(full, "__dict__")  # still slotted
