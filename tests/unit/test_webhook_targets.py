"""Which webhook targets needle connects to (services/integrations/targets.py): public addresses, and the
private ones an operator lists."""
from __future__ import annotations

import ipaddress

import pytest

from services.integrations.targets import AllowList, TargetRefused, allowed, public, resolve_checked

REFUSED = ["127.0.0.1", "127.1.2.3", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "100.64.0.1",
           "0.0.0.0", "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255", "::1", "::", "fe80::1",
           "fc00::1", "ff02::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254", "2002:7f00:1::1", "64:ff9b::a00:1",
           "198.18.0.1", "192.0.2.1"]
PUBLIC = ["93.184.216.34", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"]


@pytest.mark.parametrize("ip", REFUSED)
def test_internal_addresses_are_not_public(ip: str) -> None:
    assert not public(ipaddress.ip_address(ip))
    assert not allowed("example.org", ipaddress.ip_address(ip), AllowList())


@pytest.mark.parametrize("ip", PUBLIC)
def test_public_addresses_are(ip: str) -> None:
    assert public(ipaddress.ip_address(ip))


def test_the_operator_allows_listed_hosts_and_networks_only() -> None:
    allow = AllowList.parse(["127.0.0.1", "10.1.2.0/24", "Hooks.Internal.", " "])
    assert allowed("127.0.0.1", ipaddress.ip_address("127.0.0.1"), allow)
    assert allowed("x", ipaddress.ip_address("10.1.2.200"), allow)
    assert not allowed("x", ipaddress.ip_address("10.1.3.1"), allow)
    assert allowed("hooks.internal", ipaddress.ip_address("10.9.9.9"), allow)
    assert not allowed("x", ipaddress.ip_address("127.0.0.2"), allow)
    assert not allowed("x", ipaddress.ip_address("::1"), allow)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]", "169.254.169.254", "no-such-host.invalid"])
async def test_a_host_that_is_or_resolves_to_an_internal_address_is_refused(host: str) -> None:
    with pytest.raises(TargetRefused):
        await resolve_checked(host, 80, AllowList())


async def test_a_listed_name_resolves_to_the_address_that_is_then_used() -> None:
    found = await resolve_checked("localhost", 80, AllowList.parse(["localhost"]))
    assert found and all(ip.is_loopback for ip in found)


async def test_at_registration_a_name_that_does_not_resolve_yet_is_accepted() -> None:
    assert await resolve_checked("no-such-host.invalid", 443, AllowList(), must_resolve=False) == []
    with pytest.raises(TargetRefused):
        await resolve_checked("localhost", 443, AllowList(), must_resolve=False)
