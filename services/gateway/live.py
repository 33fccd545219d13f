"""Live figures for the workbench's runs page, read from what the services export: the model
version each Generation replica serves (its `tuneloop_generation_model_info` gauge, scraped
from every address its metrics name resolves to, so a headless Service lists every pod)."""

import asyncio
import socket

import httpx
from prometheus_client.parser import text_string_to_metric_families

MODEL_INFO = "tuneloop_generation_model_info"


def replica_addresses(target: str) -> list[str]:
    host, _, port = target.rpartition(":")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (socket.gaierror, ValueError):
        return []
    seen = dict.fromkeys(f"[{i[4][0]}]:{port}" if i[0] == socket.AF_INET6 else f"{i[4][0]}:{port}" for i in infos)
    return sorted(seen)


def served_models(text: str) -> list[dict[str, str]]:
    return [
        {"name": s.labels["name"], "version": s.labels["version"], "engine": s.labels.get("engine", "")}
        for family in text_string_to_metric_families(text)
        if family.name == MODEL_INFO
        for s in family.samples
        if s.value == 1
    ]


async def served_versions(target: str, timeout_s: float = 2.0) -> list[dict]:
    """One row per replica: its address and what it serves, or why it could not be read."""
    addresses = await asyncio.to_thread(replica_addresses, target)

    async def scrape(client: httpx.AsyncClient, address: str) -> dict:
        try:
            r = await client.get(f"http://{address}/metrics")
            r.raise_for_status()
        except httpx.HTTPError as err:
            return {"replica": address, "models": [], "error": type(err).__name__}
        return {"replica": address, "models": served_models(r.text)}

    async with httpx.AsyncClient(timeout=timeout_s) as client:
        return list(await asyncio.gather(*(scrape(client, a) for a in addresses)))
