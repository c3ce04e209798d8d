"""A CSV to a served endpoint, and predictions from Python.

Shows: `kiln train` on your own table (string labels, named columns), `kiln serve`, then
`Kiln(url=...).predict()` with a pandas DataFrame in and a DataFrame out, on rows the model
never saw. About 3 minutes on a 2-core machine that other jobs kept busy (load avg ~30),
most of it Ray and Serve starting.

    python examples/tabular_csv.py          # KILN_HOME, KILN_HTTP_PORT as for `kiln`

It registers `wine-logistic` in your KILN_HOME and stops the server it started at the end.
The last line it prints is a JSON summary.
"""

import json
import os
import signal
import subprocess
import time

import httpx
from sklearn.datasets import load_wine

from kiln import Kiln

PORT = os.environ.get("KILN_HTTP_PORT", "8000")
URL = f"http://127.0.0.1:{PORT}"

# 1. A CSV: 13 measurements of 178 wines and their cultivar, a string label. 28 rows are
#    kept out of it, to ask the served model about later.
wine = load_wine(as_frame=True)
table = wine.frame.rename(columns=lambda c: c.replace("/", "_"))
table["cultivar"] = [wine.target_names[t] for t in table.pop("target")]
table = table.sample(frac=1.0, random_state=0)
unseen, known = table.iloc[:28], table.iloc[28:]
known.to_csv("wine.csv", index=False)

# 2. Train and register it: the label is the last column; L-BFGS on the exact optimum.
command = "kiln train --data wine.csv --model logistic --register wine-logistic --json"
trained = subprocess.run(command.split(), capture_output=True, text=True)
if trained.returncode != 0:
    raise SystemExit(f"{command} failed:\n{trained.stderr[-2000:]}")
summary = json.loads(trained.stdout.splitlines()[-1])  # --json: one JSON line, last
test_accuracy = summary["metrics"]["accuracy"]
print(f"registered {summary['model']}@{summary['version']}, test accuracy {test_accuracy}")

# 3. Serve it in the background, without keys on this laptop run (serve.log warns about it).
log = open("serve.log", "w")  # what the server says goes here
serve = f"kiln serve wine-logistic --no-auth --port {PORT}"
server = subprocess.Popen(serve.split(), stdout=log, stderr=log)
try:
    deadline = time.monotonic() + 300
    while True:  # until the app answers: Ray and Serve take a few seconds to start
        try:
            if httpx.get(f"{URL}/v1/models/wine-logistic", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("kiln serve did not come up:\n" + open("serve.log").read()[-2000:])
        time.sleep(1)

    # 4. Predictions from Python: a DataFrame in (columns by name), a DataFrame out.
    kiln = Kiln(url=URL)
    answers = kiln.predict("wine-logistic", unseen.drop(columns="cultivar"))
    print(answers.head())
    accuracy = float((answers["prediction"] == unseen["cultivar"]).mean())
    print(f"served accuracy on {len(unseen)} unseen wines: {accuracy:.3f}")
    result = {
        "model": "wine-logistic",
        "version": int(answers["model_version"].iloc[0]),
        "test_accuracy": test_accuracy,
        "served_accuracy": accuracy,
        "rows": len(answers),
        "ids": answers["id"].nunique(),
    }
    print(json.dumps(result))
finally:
    server.send_signal(signal.SIGINT)  # Ctrl-C: Serve and the embedded Ray shut down
    server.wait(timeout=120)
