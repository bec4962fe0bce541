"""HTTP routes under /vbar/: read-only snapshots of the allocator, safe while sampling runs."""
import logging

log = logging.getLogger("vbar")


def snapshot():
    from .vram import _pools

    return {"pools": {dev: pool.stats() for dev, pool in list(_pools.items())}}


def register():
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:
        return False
    instance = getattr(PromptServer, "instance", None)
    if instance is None:
        return False

    @instance.routes.get("/vbar/stats")
    async def vbar_stats(request):
        return web.json_response(snapshot())

    return True
