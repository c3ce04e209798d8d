"""A language model trained, served, and streamed through the `openai` package.

Shows: `kiln train --model lm` on text (the Python standard library's json package: a
byte-level BPE tokenizer and a small Llama-style decoder, trained with Ray Train), an API key
from Python, `kiln serve` answering the OpenAI API, then the stock `openai` package with
`base_url` and the Kiln key: a chat answer streamed piece by piece, and the same answer from
`Kiln.chat(stream=True)`. About 6 minutes on a busy 2-core machine (load avg ~35). The model
is tiny and trained for 40 steps: it writes Python-looking text, not sense.

    python examples/lm_openai.py            # KILN_HOME, KILN_HTTP_PORT as for `kiln`

It registers `pylm` in your KILN_HOME and stops the server it started at the end. The last
line printed is a JSON summary.
"""

import json
import os
import signal
import subprocess
import sysconfig
import time

import httpx
from openai import OpenAI

from kiln import Kiln

PORT = os.environ.get("KILN_HTTP_PORT", "8000")
URL = f"http://127.0.0.1:{PORT}"
CORPUS = f"text:{sysconfig.get_paths()['stdlib']}/json/*.py"

# 1. Train: tokenizer and model from ~50 kB of Python source, 40 optimiser steps.
command = f"kiln train --data {CORPUS} --model lm --vocab-size 512 --block-size 128 --max-steps 40"
trained = subprocess.run([*command.split(), "--register", "pylm"], capture_output=True, text=True)
if trained.returncode != 0:
    raise SystemExit(f"{command} failed:\n{trained.stderr[-2000:]}")

# 2. A key that may call this model, created from Python (its secret is shown once).
with Kiln() as registry:
    secret = registry.create_key(["predict:pylm"])["secret"]

# 3. Serve it in the background: /v1/completions and /v1/chat/completions, keys on.
log = open("serve.log", "w")  # what the server says goes here
server = subprocess.Popen(["kiln", "serve", "pylm", "--port", PORT], stdout=log, stderr=log)
try:
    deadline = time.monotonic() + 300
    headers = {"Authorization": f"Bearer {secret}"}
    while True:  # until the app answers: Ray, Serve and the engine take a while to start
        try:
            if httpx.get(f"{URL}/v1/models", headers=headers, timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("kiln serve did not come up:\n" + open("serve.log").read()[-2000:])
        time.sleep(1)

    # 4. The stock openai package: base_url and the Kiln key are all it needs.
    client = OpenAI(base_url=f"{URL}/v1", api_key=secret)
    messages = [{"role": "user", "content": "Write a function that parses JSON."}]
    stream = client.chat.completions.create(
        model="pylm", messages=messages, max_tokens=32, temperature=0, stream=True
    )
    pieces = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()

    # 5. The same conversation through Kiln's own client, streamed too.
    with Kiln(url=URL, key=secret) as kiln:
        streamed = kiln.chat("pylm", messages, stream=True, max_tokens=32, temperature=0)
        kiln_text = "".join(streamed)
    text = "".join(pieces)
    result = {"model": "pylm", "pieces": len(pieces), "text": text, "same": kiln_text == text}
    print(json.dumps(result))
finally:
    server.send_signal(signal.SIGINT)  # Ctrl-C: Serve and the embedded Ray shut down
    server.wait(timeout=120)
