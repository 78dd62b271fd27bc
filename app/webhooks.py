"""Webhook delivery that cannot be pointed at the service's own network (SSRF guard).

A webhook URL is checked twice:

- at submit (`check_webhook_url`): scheme http/https, a host, and no literal address or name
  of loopback, private, link-local (cloud metadata), multicast, unspecified or reserved ranges,
  in any spelling (the URL parser already turns 2130706433, 0x7f000001, 0177.0.0.1 into
  127.0.0.1; IPv4-mapped and NAT64/6to4 IPv6 forms are unwrapped here);
- at send (`deliver`): the host is resolved, every address it resolves to must pass the
  same check, and the request goes to the vetted address itself (the Host header and TLS
  server name carry the name), so a second DNS answer cannot switch it to an internal one.
  Redirects are never followed.

Hosts named in MODELPRESS_WEBHOOK_ALLOWED_HOSTS skip the range check (internal receivers
a deployment trusts); they are still resolved once and pinned.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

import httpx

from app.config import get_settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Names that mean "this machine" or a cloud metadata service whatever DNS says.
_BLOCKED_NAMES = (
    "localhost",
    "localhost.localdomain",
    "ip6-localhost",
    "ip6-loopback",
    "metadata",
    "metadata.google.internal",
    "instance-data",
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
USER_AGENT = "ModelPress-Webhook/1"


class WebhookRefused(ValueError):
    """The URL points (or resolves) somewhere webhooks must not go; the message says why."""


def allowed_hosts() -> frozenset[str]:
    return frozenset(_normal_name(h) for h in get_settings().webhook_allowed_hosts if h.strip())


def _normal_name(host: str) -> str:
    return host.strip().strip("[]").rstrip(".").lower()


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped, compatible, 6to4, NAT64), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    packed = int(address)
    if packed >> 32 == 0 and packed > 1:  # deprecated IPv4-compatible ::a.b.c.d
        return ipaddress.IPv4Address(packed)
    return None


def address_problem(address: IPAddress) -> str | None:
    """Why a webhook must not go to `address`, or None for a public unicast address."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id:
            return f"{address} has a zone index (link-local)"
        inner = _embedded_ipv4(address)
        if inner is not None:
            problem = address_problem(inner)
            return f"{address} embeds {inner}: {problem}" if problem else None
    for label, hit in (
        ("a loopback address", address.is_loopback),
        ("the unspecified address", address.is_unspecified),
        ("a link-local address (cloud metadata lives there)", address.is_link_local),
        ("a multicast address", address.is_multicast),
        ("a private address", address.is_private),
        ("a reserved address", address.is_reserved),
    ):
        if hit:
            return f"{address} is {label}"
    if not address.is_global:
        return f"{address} is not a public address"
    return None


def _literal_address(host: str) -> IPAddress | None:
    name = host.strip("[]")
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        pass
    try:  # the classic inet_aton spellings (2130706433, 0x7f.1, 0177.0.0.1) in case a parser kept them
        return ipaddress.IPv4Address(socket.inet_aton(name))
    except OSError:
        return None


def host_problem(host: str) -> str | None:
    """What is wrong with a URL's host on its own (no DNS), or None."""
    name = _normal_name(host)
    if not name:
        return "the URL has no host"
    if name in allowed_hosts():
        return None
    literal = _literal_address(name)
    if literal is not None:
        return address_problem(literal)
    if name in _BLOCKED_NAMES or name.endswith(".localhost"):
        return f"{name} names this machine or a metadata service"
    return None


def check_webhook_url(url: str) -> None:
    """Submit-time check; raises WebhookRefused with the reason."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as error:
        raise WebhookRefused(f"not a valid URL: {error}") from None
    if parsed.scheme not in ("http", "https"):
        raise WebhookRefused(f"the scheme must be http or https, not {parsed.scheme!r}")
    if parsed.userinfo:
        raise WebhookRefused("credentials in the URL are not accepted")
    problem = host_problem(parsed.host)
    if problem:
        raise WebhookRefused(problem)


def resolve_vetted(host: str, port: int) -> IPAddress:
    """Resolve `host`; every address must pass (unless the host is allowed). Returns the one to use."""
    name = _normal_name(host)
    try:
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
        raise WebhookRefused(f"{name} does not resolve: {error}") from None
    addresses: list[IPAddress] = []
    for info in infos:
        text = str(info[4][0]).split("%", 1)[0]
        address = ipaddress.ip_address(text)
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise WebhookRefused(f"{name} resolves to no address")
    if name not in allowed_hosts():
        for address in addresses:
            problem = address_problem(address)
            if problem:
                raise WebhookRefused(f"{name} resolves to {problem}")
    return addresses[0]


@dataclass
class Delivery:
    status_code: int | None = None
    error: str | None = None
    refused: str | None = None


def deliver(url: str, body: dict[str, Any], *, timeout: float = 5.0) -> Delivery:
    """POST `body` to `url` once, through the SSRF guard; never raises for network trouble."""
    try:
        check_webhook_url(url)
        parsed = httpx.URL(url)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        address = resolve_vetted(parsed.host, port)
    except WebhookRefused as refusal:
        return Delivery(refused=str(refusal))
    pinned = parsed.copy_with(host=str(address))
    host_header = parsed.host if parsed.port is None else f"{parsed.host}:{parsed.port}"
    if ":" in parsed.host and parsed.port is None:
        host_header = f"[{parsed.host}]"
    elif ":" in parsed.host:
        host_header = f"[{parsed.host}]:{parsed.port}"
    extensions = {"sni_hostname": parsed.host} if parsed.scheme == "https" else {}
    try:
        with httpx.Client(follow_redirects=False, trust_env=False, timeout=timeout) as client:
            request = client.build_request(
                "POST",
                pinned,
                json=body,
                extensions=extensions,
                headers={"Host": host_header, "User-Agent": USER_AGENT},
            )
            response = client.send(request)
        return Delivery(status_code=response.status_code)
    except httpx.HTTPError as error:
        return Delivery(error=str(error)[:200] or type(error).__name__)
