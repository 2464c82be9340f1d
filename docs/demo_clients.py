import asyncio, json, time, urllib.request
import aiohttp

def sleep(tag, s=2.0): return {"1": {"class_type": "CPSleep", "inputs": {"seconds": s, "steps": 4, "tag": tag}}}

async def ws_client(url, cid, n_done, log):
    async with aiohttp.ClientSession() as sess, sess.ws_connect(f"{url}?clientId={cid}") as ws:
        done = 0
        async for m in ws:
            d = json.loads(m.data)
            if d["type"] in ("execution_start", "executing", "progress", "execution_success"):
                log.append(f"{time.strftime('%H:%M:%S')} ws[{cid}] {d['type']} {json.dumps(d['data'])[:90]}")
            if d["type"] == "executing" and d["data"].get("node") is None:
                done += 1
                if done == n_done: return

def post(url, body, headers={}):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json", **headers})
    return json.loads(urllib.request.urlopen(req).read())

async def main():
    log = []
    # the web UI route: the page, then what the frontend calls under /gpu1/
    page = urllib.request.urlopen("http://127.0.0.1:8188/gpu1/").read()
    log.append(f"GET /gpu1/ -> {len(page)} bytes of the ComfyUI web UI")
    ui = asyncio.create_task(ws_client("ws://127.0.0.1:8188/gpu1/ws", "webui", 1, log))
    api_ws = asyncio.create_task(ws_client("ws://127.0.0.1:8188/ws", "apiclient", 2, log))
    await asyncio.sleep(0.5)
    loop = asyncio.get_running_loop()
    r1 = await loop.run_in_executor(None, post, "http://127.0.0.1:8188/api/prompt", {"prompt": sleep("api-to-gpu0"), "client_id": "apiclient"}, {"X-TARGET-GPU": "0"})
    r2 = await loop.run_in_executor(None, post, "http://127.0.0.1:8188/gpu1/api/prompt", {"prompt": sleep("webui-on-gpu1"), "client_id": "webui"})
    r3 = await loop.run_in_executor(None, post, "http://127.0.0.1:8181/prompt", {"prompt": sleep("api-port-8181", 1.0), "client_id": "apiclient"})
    for name, r in (("API X-TARGET-GPU:0", r1), ("web UI /gpu1/api/prompt", r2), ("API entry port 8181", r3)):
        log.append(f"POST {name} -> prompt_id={r['prompt_id'][:8]} gpu_id={r['gpu_id']}")
    log.append("GET /debug/queues -> " + urllib.request.urlopen("http://127.0.0.1:8188/debug/queues").read().decode())
    await asyncio.gather(ui, api_ws)
    hist = json.loads(urllib.request.urlopen("http://127.0.0.1:8188/history").read())
    for pid, e in hist.items():
        rec = e["outputs"]["1"]["record"][0]
        log.append(f"history {pid[:8]} gpu_id={e['gpu_id']} {e['status']['status_str']} tag={rec['tag']} thread={rec['thread']} ran {time.strftime('%H:%M:%S', time.localtime(rec['start']))}+{rec['end']-rec['start']:.1f}s")
    print("\n".join(log))

asyncio.run(main())
