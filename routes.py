"""HTTP routes under /vbar/ and the live "vbar.stats" events: read-only snapshots of the
allocator, safe while sampling runs.

``register()`` runs when ComfyUI first reads the pack's node mappings (the root __init__.py),
right after importing it: with ComfyUI's server up it adds ``GET /vbar/stats`` and starts one
daemon thread (StatsPusher) that wakes every PUSH_INTERVAL_S; without a server (tests,
scripts) it does nothing."""
import logging
import threading

log = logging.getLogger("vbar")

PUSH_INTERVAL_S = 0.5      # at most 2 events a second
_pusher = None


def snapshot():
    """``{"time", "pools": {dev: pool.stats() + per-VBAR "slot_states" (one letter per slot,
    H held / R resident / S streamed) and "streamed_bytes"}, "devices": {dev: total/free,
    torch allocated/reserved}}``."""
    from .vram import report

    return report.collect()


def activity(pools):
    """A change detector read without the pool lock (plain int reads): it moves whenever a
    fault, eviction, load or budget change happened. Cheap enough to poll twice a second."""
    sig = []
    for dev, pool in pools.items():
        vbars = list(pool.vbars)
        sig.append((dev, pool.mapped_bytes, pool.limit, pool.headroom, len(vbars),
                    sum(v.counters.faults + v.counters.evictions for v in vbars)))
    return tuple(sig)


class StatsPusher(threading.Thread):
    """Sends "vbar.stats" to the browser when the allocator changed, at most every
    PUSH_INTERVAL_S. Idle (nothing changes between runs) it sends nothing, and it never runs on
    the sampling thread: a snapshot holds the pool lock only while it copies the counters and
    page maps (0.04 ms for three models of 1000 weights each; docs/measured.md)."""

    def __init__(self, send, interval=PUSH_INTERVAL_S):
        super().__init__(name="vbar-stats-pusher", daemon=True)
        self.send = send
        self.interval = interval
        self.stopped = threading.Event()
        self.last = None

    def tick(self):
        """Send if something changed since the last send. Returns whether it sent."""
        from .vram import pools

        sig = activity(pools())
        if sig == self.last:
            return False
        self.last = sig
        self.send("vbar.stats", snapshot())
        return True

    def run(self):
        while not self.stopped.wait(self.interval):
            try:
                self.tick()
            except RuntimeError as e:
                # The server's event loop closed (shutdown): nobody to send to any more.
                log.debug("vbar stats pusher stops: %s", e)
                return
            except Exception:  # noqa: BLE001 - a broken snapshot must not kill the server
                log.exception("vbar stats pusher: snapshot failed; retrying in 5 s")
                self.stopped.wait(5.0)

    def stop(self):
        self.stopped.set()


def register():
    global _pusher
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

    if _pusher is None:
        _pusher = StatsPusher(instance.send_sync)
        _pusher.start()
    return True

