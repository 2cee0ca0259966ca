"""The web UI on a live server: people (owners with roles and local passwords) and a
cookie-carrying browser-like client that follows the UI's forms."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any

import httpx

from taskbound.config import load_settings
from taskbound.ui.auth import Authenticator
from tests.api.conftest import (
    Live,
    live,  # noqa: F401  (the live-server fixture, for tests/ui)
)

PASSWORD = "correct horse battery staple"
PEOPLE = {
    "alice": ["approver"],  # the agent's accountable owner (REGISTRY)
    "carol": ["approver"],
    "dan": ["approver", "reviewer"],
    "erin": ["admin"],
    "frank": ["reviewer"],
    "gus": [],  # signed in but no role
}


async def add_people(server: Live, people: dict[str, list[str]] = PEOPLE) -> None:
    """Owners with roles and the same local password (alice exists already)."""
    for owner_id, roles in people.items():
        body = {"id": owner_id, "contact": f"{owner_id}@example.com", "roles": roles}
        r = await server.http.put(f"/v1/admin/owners/{owner_id}", json=body, headers=server.admin)
        if r.status_code == 404:
            r = await server.http.post("/v1/admin/owners", json=body, headers=server.admin)
        assert r.status_code in (200, 201), r.text
        await server.services.storage.set_owner_password(owner_id, _hash_once(), server.clock.now())


@functools.cache
def _hash_once() -> str:
    """PASSWORD's Argon2id hash, made once per test process (hashing is slow on purpose;
    every sign-in still verifies it for real)."""
    return Authenticator(load_settings(environ={})).hash_password(PASSWORD)


_HIDDEN = re.compile(r'<input type="hidden" name="csrf" value="([^"]+)">')


@dataclass
class Browser:
    """Cookies kept by hand (the UI's are Secure; httpx keeps those only over https)."""

    live: Live
    cookies: dict[str, str] = field(default_factory=dict)
    last: httpx.Response | None = None

    def _keep(self, r: httpx.Response) -> None:
        for raw in r.headers.get_list("set-cookie"):
            name, _, rest = raw.partition("=")
            value = rest.split(";", 1)[0]
            if "max-age=0" in raw.lower() or "expires=thu, 01 jan 1970" in raw.lower():
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = value

    async def request(
        self, method: str, path: str, *, headers: dict[str, str] | None = None, **kw: Any
    ) -> httpx.Response:
        h = {"Cookie": "; ".join(f"{k}={v}" for k, v in self.cookies.items())}
        if method == "POST":
            h["Origin"] = self.live.base
            h["Sec-Fetch-Site"] = "same-origin"
        h.update(headers or {})
        r = await self.live.http.request(method, path, headers=h, **kw)
        self._keep(r)
        self.last = r
        return r

    async def get(self, path: str, **kw: Any) -> httpx.Response:
        return await self.request("GET", path, **kw)

    def csrf(self, r: httpx.Response | None = None) -> str:
        found = _HIDDEN.search((r or self.last).text)  # type: ignore[union-attr]
        assert found, "no anti-forgery token on the page"
        return found.group(1)

    async def post(
        self, path: str, data: dict[str, str], *, csrf: str | None = None, **kw: Any
    ) -> httpx.Response:
        return await self.request("POST", path, data={"csrf": csrf or self.csrf(), **data}, **kw)

    async def sign_in(self, owner: str, password: str = PASSWORD) -> httpx.Response:
        await self.get("/ui/login")
        return await self.post("/ui/login", {"owner": owner, "password": password})
