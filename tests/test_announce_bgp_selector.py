"""announce_bgp's serviceSelector is core's label selector (kpr.selectors, tested in
test_selectors.py): the config takes its shape and errors, and an advertisement matches with it."""

from kpr.model import Backend, BackendState, Frontend, FrontendType, Protocol, Service, ServiceKey
from kpr.plugins.announce_bgp.config import AnnounceBGPConfig
from kpr.plugins.announce_bgp.plugin import advertisements_of
from kpr.plugins.announce_bgp.routes import announced_addresses
from kpr.selectors import LabelSelectorConfig, Selector

SELECTED = {
    "localASN": 64512,
    "advertisements": [
        {"serviceSelector": {"matchLabels": {"bgp": "yes"}, "matchExpressions": [{"key": "env", "operator": "NotIn", "values": ["dev"]}]}},
        {},
    ],
}


def lb(labels: dict[str, str]) -> Service:
    return Service(
        ServiceKey("default", "web"),
        (Frontend(FrontendType.LOAD_BALANCER, "10.0.100.10", 80, Protocol.TCP, (Backend("10.244.0.5", 8080, BackendState.ACTIVE),)),),
        labels=tuple(sorted(labels.items())),
    )


def test_the_config_takes_cores_selector():
    cfg = AnnounceBGPConfig.model_validate(SELECTED)
    selected, everything = cfg.advertisements
    assert isinstance(selected.service_selector, LabelSelectorConfig)
    assert everything.service_selector == LabelSelectorConfig()


def test_advertisements_match_services_with_it():
    selected, everything = advertisements_of(AnnounceBGPConfig.model_validate(SELECTED))
    assert selected.selector == Selector.build({"bgp": "yes"}, [("env", "NotIn", ["dev"])])
    assert everything.selector.empty
    assert announced_addresses(lb({"bgp": "yes"}), selected) == {"10.0.100.10"}
    assert announced_addresses(lb({"bgp": "yes", "env": "prod"}), selected) == {"10.0.100.10"}
    assert announced_addresses(lb({"bgp": "yes", "env": "dev"}), selected) == set()
    assert announced_addresses(lb({}), selected) == set()
    assert announced_addresses(lb({}), everything) == {"10.0.100.10"}
