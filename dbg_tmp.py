import asyncio, aiohttp
from aiohttp import web
from router.app import create_app, METRICS, SESSION, REGISTRY
from router.server import RouterRunner
from tests.router.conftest import test_config
from engines.sim.fleet import SimFleet
async def main():
    async with SimFleet(2, time_scale=0.01, profile="tiny") as f:
        cfg = test_config(worker_urls=tuple(f.urls), policy="kv_aware", health_check_interval_s=10, load_poll_interval_s=5)
        app = create_app(cfg); r = RouterRunner(app, cfg, app[METRICS]); await r.setup()
        s = web.TCPSite(r, "127.0.0.1", 0); await s.start()
        host, port = r.addresses[0][:2]; url=f"http://{host}:{port}"
        await asyncio.sleep(1)
        pool = app[REGISTRY]._pool
        async with aiohttp.ClientSession() as cs:
            async def one(i):
                async with cs.post(url+"/generate", json={"text": f"hello {i}"*5, "stream": True, "sampling_params": {"max_new_tokens": 20}}) as resp:
                    await resp.read()
            await asyncio.gather(*(one(i) for i in range(100)))
        print("after load: all", len(pool._all), "idle", pool.idle_count(), "busy", {k: len(a.busy) for k,a in pool._hosts.items()})
        await asyncio.sleep(8)
        print("after 8s: all", len(pool._all), "idle", pool.idle_count(), "busy", {k: len(a.busy) for k,a in pool._hosts.items()}, "reaper", pool._reaper)
        conn = app[SESSION].connector
        print("control conns", {k: len(v) for k, v in conn._conns.items()}, "acquired", len(conn._acquired))
        await r.cleanup()
asyncio.run(main())
