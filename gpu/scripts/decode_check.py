"""Decode speed of a running PD server: requests of 64 output tokens, 1 and 8 at a time; prints
the median time per output token after the first, from the server's /debug/requests."""
import json
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor

pd = sys.argv[1]
body = {"model": "m", "messages": [{"role": "user", "content": "Describe a photograph of a harbour at dusk. " * 60}],
        "max_tokens": 64}


def one(_):
    req = urllib.request.Request(pd + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    urllib.request.urlopen(req, timeout=120).read()


for n in (1, 8):
    urllib.request.urlopen(urllib.request.Request(pd + "/debug/requests", method="DELETE")).read()
    with ThreadPoolExecutor(n) as ex:
        list(ex.map(one, range(n)))
    log = json.loads(urllib.request.urlopen(pd + "/debug/requests").read())
    tpot = sorted((e["e2e_ms"] - e["ttft_ms"]) / (e["completion_tokens"] - 1) for e in log)
    print(f"decode, {n} concurrent requests of 64 tokens: {tpot[len(tpot) // 2]:.1f} ms per token (median)")
