#!/usr/bin/env python3
"""Load generator for `cca serve` (standard library only: it runs on the GPU machine as is).

Load mode (default): for each concurrency C of --clients, C client threads each send
--requests-per-client streaming /v1/completions requests at once: a prompt of --prompt-tokens
random token ids (a different one per request), --max-tokens generated tokens (ignore_eos, greedy).
Per request it records the time to the first token (TTFT: from sending to the first event) and
the gaps between the following events (ITL; the server sends one event per token); per level it
reports output tokens/s over the level's wall time, TTFT and ITL percentiles, errors.

Capacity mode (--capacity): sends --capacity-requests streaming requests of --prompt-tokens at
once and reads /metrics until every one is running or queued: the number running is how many
conversations the server admitted, i.e. whose caches it allocated within its cache budget (start
the server with a --parallel above that number). With --verify-first-token it then waits until
each admitted one has produced its first token (its whole prompt prefilled).

Writes --json and prints a short table last. --table F.json ... prints the tables of earlier runs.
    python3 bench/serve_load.py --url http://127.0.0.1:8080 --clients 1,8,32 \
        --prompt-tokens 32768 --max-tokens 256 --label cca --json out/load-cca.json
"""
import argparse
import http.client
import json
import random
import sys
import threading
import time
import urllib.parse


def percentile(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


class Server:
    def __init__(self, url, api_key, timeout):
        u = urllib.parse.urlparse(url)
        self.host, self.port = u.hostname, u.port or 80
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = "Bearer " + api_key
        self.timeout = timeout

    def conn(self):
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def metrics(self):
        c = self.conn()
        c.request("GET", "/metrics", headers=self.headers)
        body = c.getresponse().read().decode()
        c.close()
        out = {}
        for line in body.splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stream(self, body, on_event, stop=None):
        """POSTs a streaming completion; calls on_event(t, json) per data event. Returns
        (status, error text or None)."""
        c = self.conn()
        try:
            c.request("POST", "/v1/completions", body=json.dumps(body), headers=self.headers)
            r = c.getresponse()
            if r.status != 200:
                return r.status, r.read().decode()[:300]
            buf = b""
            while True:
                if stop is not None and stop.is_set():
                    return 0, "stopped"
                chunk = r.read1(65536)
                if not chunk:
                    return 200, "the stream ended without [DONE]"
                buf += chunk
                while b"\n\n" in buf:
                    ev, buf = buf.split(b"\n\n", 1)
                    if not ev.startswith(b"data: "):
                        continue
                    data = ev[6:]
                    if data == b"[DONE]":
                        return 200, None
                    j = json.loads(data)
                    if "error" in j:
                        return 200, j["error"].get("message")
                    on_event(time.perf_counter(), j)
        except Exception as e:  # a refused connection, a timeout
            return -1, repr(e)
        finally:
            c.close()


def prompt_ids(rng, n, vocab):
    return [rng.randrange(3, vocab) for _ in range(n)]


def run_level(srv, clients, args, seed):
    results = []
    lock = threading.Lock()

    def client(ci):
        rng = random.Random(seed * 1000003 + ci)
        for k in range(args.requests_per_client):
            body = {"prompt": prompt_ids(rng, args.prompt_tokens, args.vocab),
                    "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}
            times = []
            usage = {}

            def on_event(t, j):
                if j.get("usage"):
                    usage.update(j["usage"])
                elif j["choices"] and j["choices"][0].get("finish_reason") is None:
                    times.append(t)

            t0 = time.perf_counter()
            status, err = srv.stream(body, on_event)
            t1 = time.perf_counter()
            r = {"client": ci, "status": status, "error": err, "start": t0, "end": t1,
                 "tokens": usage.get("completion_tokens", len(times)),
                 "prompt_tokens": usage.get("prompt_tokens", 0),
                 "ttft": times[0] - t0 if times else None,
                 "itl": [b - a for a, b in zip(times, times[1:])]}
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    w0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - w0
    ok = [r for r in results if r["status"] == 200 and r["error"] is None]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    itl = [x for r in ok for x in r["itl"]]
    gen = sum(r["tokens"] for r in ok)
    prompt = sum(r["prompt_tokens"] for r in ok)
    level = {"clients": clients, "requests": len(results), "ok": len(ok),
             "errors": sorted({str(r["status"]) + ": " + str(r["error"]) for r in results if r not in ok})[:5],
             "wall_s": wall, "generated_tokens": gen, "prompt_tokens": prompt,
             "output_tok_s": gen / wall if wall > 0 else 0,
             "total_tok_s": (gen + prompt) / wall if wall > 0 else 0,
             "requests_s": len(ok) / wall if wall > 0 else 0}
    for name, xs in (("ttft_s", ttft), ("itl_s", itl)):
        for p in (50, 90, 99):
            level[f"{name}_p{p}"] = percentile(xs, p)
        level[f"{name}_mean"] = sum(xs) / len(xs) if xs else None
    return level


def run_capacity(srv, args):
    """Sends the requests at once and reads how many the server admits."""
    stop = threading.Event()
    first = {}
    statuses = {}
    lock = threading.Lock()

    def client(ci):
        rng = random.Random(7919 + ci)
        body = {"prompt": prompt_ids(rng, args.prompt_tokens, args.vocab),
                "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True}

        def on_event(t, j):
            with lock:
                first.setdefault(ci, t)

        status, err = srv.stream(body, on_event, stop)
        with lock:
            statuses[ci] = (status, err)

    n = args.capacity_requests
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    running = queued = -1
    best = {}
    deadline = time.time() + 120
    while time.time() < deadline:
        m = srv.metrics()
        running, queued = int(m.get("cca_requests_running", -1)), int(m.get("cca_requests_queued", -1))
        if running > best.get("cca_requests_running", -1):
            best = m
        with lock:
            refused = sum(1 for s, _ in statuses.values() if s not in (0, 200))
            finished = len(statuses)
        if running + queued + refused >= n or finished >= n:
            break
        time.sleep(0.2)
    # The most requests seen running at once (a request that finished before a scrape is not
    # counted: ask for enough --max-tokens that they stay).
    cap = {"prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens, "sent": n,
           "admitted": int(best.get("cca_requests_running", 0)),
           "queued": int(best.get("cca_requests_queued", 0)),
           "kv_reserved_bytes": best.get("cca_kv_cache_reserved_bytes"),
           "kv_budget_bytes": best.get("cca_kv_cache_budget_bytes")}
    running = cap["admitted"]
    if args.verify_first_token and running > 0:
        end = time.time() + args.verify_timeout
        while time.time() < end:
            with lock:
                got = len(first)
            if got >= running:
                break
            time.sleep(1)
        with lock:
            cap["first_token_of_admitted"] = min(len(first), running)
        cap["verify_s"] = time.perf_counter() - t0
    stop.set()  # the streams close: the server frees their slots
    return cap


def fmt(x, scale=1.0, digits=1):
    return "-" if x is None else f"{x * scale:.{digits}f}"


def print_tables(runs):
    loads = [r for r in runs if r.get("mode") == "load"]
    caps = [r for r in runs if r.get("mode") == "capacity"]
    if loads:
        print("| variant | clients | prompt | gen | ok/req | out tok/s | TTFT p50 / p90 / p99 (s) | ITL p50 / p90 / p99 (ms) |")
        print("|---|---|---|---|---|---|---|---|")
        for r in loads:
            for l in r["levels"]:
                print(f"| {r['label']} | {l['clients']} | {r['prompt_tokens']} | {r['max_tokens']} | "
                      f"{l['ok']}/{l['requests']} | {fmt(l['output_tok_s'])} | "
                      f"{fmt(l['ttft_s_p50'], 1, 2)} / {fmt(l['ttft_s_p90'], 1, 2)} / {fmt(l['ttft_s_p99'], 1, 2)} | "
                      f"{fmt(l['itl_s_p50'], 1e3)} / {fmt(l['itl_s_p90'], 1e3)} / {fmt(l['itl_s_p99'], 1e3)} |")
    if caps:
        print("| variant | prompt tokens | sent | admitted at once | first token of admitted | cache reserved (GiB) | budget (GiB) |")
        print("|---|---|---|---|---|---|---|")
        for r in caps:
            c = r["capacity"]
            gib = lambda b: "-" if b is None else f"{b / 2**30:.1f}"
            print(f"| {r['label']} | {c['prompt_tokens']} | {c['sent']} | {c['admitted']} | "
                  f"{c.get('first_token_of_admitted', '-')} | {gib(c['kv_reserved_bytes'])} | {gib(c['kv_budget_bytes'])} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--api-key", default="")
    ap.add_argument("--label", default="cca", help="names the run in the table (e.g. the variant)")
    ap.add_argument("--clients", default="1,8,32", help="concurrency levels")
    ap.add_argument("--requests-per-client", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=32768)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=128000, help="prompt ids are drawn from [3, vocab)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per HTTP read")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--capacity", action="store_true", help="capacity mode (see above)")
    ap.add_argument("--capacity-requests", type=int, default=160)
    ap.add_argument("--verify-first-token", action="store_true")
    ap.add_argument("--verify-timeout", type=float, default=1200)
    ap.add_argument("--json", default="", help="write the results here")
    ap.add_argument("--table", nargs="*", help="print the tables of these result files and exit")
    args = ap.parse_args()
    if args.table is not None:
        runs = []
        for f in args.table:
            with open(f) as fh:
                runs.append(json.load(fh))
        print_tables(runs)
        return 0
    srv = Server(args.url, args.api_key, args.timeout)
    run = {"label": args.label, "url": args.url, "prompt_tokens": args.prompt_tokens,
           "max_tokens": args.max_tokens, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.capacity:
        run["mode"] = "capacity"
        run["capacity"] = run_capacity(srv, args)
    else:
        run["mode"] = "load"
        run["levels"] = []
        for i, c in enumerate(int(x) for x in args.clients.split(",")):
            level = run_level(srv, c, args, args.seed + i)
            run["levels"].append(level)
            print(f"{args.label}: {c} clients: {level['ok']}/{level['requests']} ok, "
                  f"{level['output_tok_s']:.1f} output tok/s, TTFT p50 {fmt(level['ttft_s_p50'], 1, 2)} s, "
                  f"ITL p50 {fmt(level['itl_s_p50'], 1e3)} ms", file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(run, f, indent=1)
    print_tables([run])
    return 0


if __name__ == "__main__":
    sys.exit(main())
